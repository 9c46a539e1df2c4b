//! The JIT line table `lb-bench --jit-lines` writes for `cargo xtask profile`, read from the
//! real kernel for a loaded datapath (needs root).

use std::{fs, os::fd::AsRawFd as _};

use lab::{
    jit_lines::write_jit_lines,
    lab::{Lab, PinDir},
};
use lb_common::program_names;
use lb_userspace::datapath::Datapath;

/// Removes the table's file when the test ends, also when it fails.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn lb_xdp_s_jit_image_maps_to_the_datapath_s_source_lines_under_perf_s_symbol() {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "jitlines").expect("pins");
    let datapath = Datapath::load(pins.path()).expect("load");
    let file =
        TempFile(std::env::temp_dir().join(format!("lbt{}-jit-lines.tsv", std::process::id())));

    let rows = write_jit_lines(&file.0).expect("write the table");
    let table = fs::read_to_string(&file.0).expect("read the table");
    assert_eq!(table.lines().count(), rows);

    // perf names a program's main function bpf_prog_<tag>_<name>; the tag is the kernel's.
    let xdp = datapath.program_fd(program_names::XDP_LB).expect("lb_xdp");
    let fdinfo = fs::read_to_string(format!("/proc/self/fdinfo/{}", xdp.as_raw_fd()))
        .expect("fdinfo of lb_xdp");
    let tag = fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("prog_tag:"))
        .expect("prog_tag")
        .trim();
    let symbol = format!("bpf_prog_{tag}_{}", program_names::XDP_LB);
    let offsets_and_places: Vec<(u64, &str)> = table
        .lines()
        .filter_map(|row| {
            let fields: Vec<&str> = row.split('\t').collect();
            (fields[0] == symbol).then(|| {
                (
                    u64::from_str_radix(fields[1], 16).expect("hex offset"),
                    fields[2],
                )
            })
        })
        .collect();
    assert!(
        offsets_and_places.len() > 1000,
        "{} rows for {symbol}",
        offsets_and_places.len()
    );
    // The image starts with the program's entry, and its lines come from the datapath's files.
    let (first_offset, first_place) = offsets_and_places
        .iter()
        .min_by_key(|(offset, _)| *offset)
        .expect("a first row");
    assert_eq!(*first_offset, 0);
    assert!(first_place.contains("lb-ebpf/src/xdp.rs:"), "{first_place}");
    for file in ["lb-ebpf/src/flow.rs:", "lb-ebpf/src/packet.rs:"] {
        assert!(
            offsets_and_places
                .iter()
                .any(|(_, place)| place.contains(file)),
            "no line of {file} in {symbol}"
        );
    }
}
