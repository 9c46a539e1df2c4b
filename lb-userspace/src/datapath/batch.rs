//! Reading a whole hash map in chunks (BPF_MAP_LOOKUP_BATCH, kernel >= 5.6): aya 0.16 iterates
//! with two syscalls per entry (get_next_key, then lookup), which for a full conntrack map of
//! 524,288 entries is about a million syscalls, on every agent start and every metrics scrape.
//! Writing a whole array in one syscall (BPF_MAP_UPDATE_BATCH), as a Maglev table is written,
//! and setting and deleting an entry of an array of maps on a plain descriptor.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd, BorrowedFd},
};

/// include/uapi/linux/bpf.h, `enum bpf_cmd`.
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries asked for per syscall. A chunk must hold every entry of the largest hash bucket
/// (ENOSPC otherwise, which `read_all` answers by asking for more).
const CHUNK: u32 = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of the hash or LRU hash map `map` (not a per-CPU one), or every entry in
/// use of an array of maps (values: the maps' ids; empty entries are skipped, kernel/bpf/
/// syscall.c, `generic_map_lookup_batch`), read in chunks. Entries the programs add or remove
/// during the walk may be seen or not, as with an iterator.
///
/// `K` and `V` must be the map's key and value types: plain `repr(C)` data for which any bytes
/// are a valid value (aya's `Pod`), of exactly the map's key and value sizes.
pub fn read_all<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut entries = Vec::new();
    visit_all(map, |key, value| entries.push((key, value)))?;
    Ok(entries)
}

/// [`read_all`] without collecting: `visit` sees each entry as its chunk arrives, so a walk of
/// a large array holds one chunk at a time.
pub fn visit_all<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    mut visit: impl FnMut(K, V),
) -> io::Result<()> {
    // A hash map's batch position is a bucket index, an array's a key (kernel/bpf/hashtab.c,
    // `__htab_map_lookup_and_delete_batch`).
    let mut position: u32 = 0;
    let mut first = true;
    let mut chunk = CHUNK;
    loop {
        let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(chunk as usize);
        let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(chunk as usize);
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                (&raw const position) as u64
            },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the attribute points at buffers of `chunk` keys and values of the map's sizes
        // (the caller's contract) and at two u32 positions, all alive for the call; the kernel
        // writes at most `count` entries and reports how many in `count`.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let error = (result < 0).then(io::Error::last_os_error);
        match error.as_ref().and_then(io::Error::raw_os_error) {
            // A bucket larger than the chunk: ask again from the same place with more room.
            Some(libc::ENOSPC) if chunk < 1 << 20 => {
                chunk *= 4;
                continue;
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => return Err(error.unwrap_or_else(io::Error::last_os_error)),
        }
        let filled = (attr.count as usize).min(chunk as usize);
        // SAFETY: the kernel wrote the first `filled` keys and values.
        unsafe {
            keys.set_len(filled);
            values.set_len(filled);
        }
        for (key, value) in keys.into_iter().zip(values) {
            // SAFETY: initialised by the kernel, see above.
            unsafe { visit(key.assume_init(), value.assume_init()) };
        }
        // ENOENT: the walk reached the end (with or without entries in this last chunk).
        if error.is_some() {
            return Ok(());
        }
        position = next;
        first = false;
    }
}

/// Writes `values` into cells 0.. of the array `map` (whose value type `V` is), in one syscall.
pub fn write_array<V: aya::Pod>(map: BorrowedFd<'_>, values: &[V]) -> io::Result<()> {
    let keys: Vec<u32> = (0..values.len() as u32).collect();
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: values.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the attribute points at `count` u32 keys and `count` values of the map's value
    // size (the caller's contract), alive for the call; the kernel only reads them.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &raw mut attr,
            size_of::<BatchAttr>(),
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    // The kernel stops at the first failing cell and reports how many it wrote.
    if attr.count as usize != values.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("{} of {} cells written", attr.count, values.len()),
        ));
    }
    Ok(())
}

/// The element-command member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Sets entries of the array of maps `map`, each to its map, in one syscall: each entry changes
/// in one update (a program sees its old map or its new one), and the kernel waits for the
/// programs running meanwhile once for the whole batch, not once per entry (kernel/bpf/
/// syscall.c, `maybe_wait_bpf_programs`: a grace period, milliseconds).
pub fn set_array_entries(map: BorrowedFd<'_>, entries: &[(u32, BorrowedFd<'_>)]) -> io::Result<()> {
    let keys: Vec<u32> = entries.iter().map(|(key, _)| *key).collect();
    let values: Vec<u32> = entries
        .iter()
        .map(|(_, inner)| inner.as_raw_fd() as u32)
        .collect();
    batch_elements(map, BPF_MAP_UPDATE_BATCH, &keys, Some(&values))
}

/// Deletes entries `keys` of the array of maps `map` in one syscall; the maps they referred to
/// go once no program reads them.
pub fn delete_array_entries(map: BorrowedFd<'_>, keys: &[u32]) -> io::Result<()> {
    batch_elements(map, BPF_MAP_DELETE_BATCH, keys, None)
}

fn batch_elements(
    map: BorrowedFd<'_>,
    command: libc::c_long,
    keys: &[u32],
    values: Option<&[u32]>,
) -> io::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |values| values.as_ptr() as u64),
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the attribute points at `count` u32 keys (and as many u32 values), alive for the
    // call; the kernel only reads them.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            &raw mut attr,
            size_of::<BatchAttr>(),
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Deletes entry `key` of the array of maps `map`: the map it referred to goes once no program
/// reads it any more. An empty entry is not an error.
pub fn delete_array_entry(map: BorrowedFd<'_>, key: u32) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: (&raw const key) as u64,
        ..Default::default()
    };
    // SAFETY: the attribute points at a u32 key alive for the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            &raw mut attr,
            size_of::<ElemAttr>(),
        )
    };
    if result < 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ENOENT) {
            return Err(error);
        }
    }
    Ok(())
}

/// [`read_all`] of an aya hash map or array handle, failing as aya's own calls do.
pub fn read_map<K: aya::Pod, V: aya::Pod>(
    map: &impl aya::maps::IterableMap<K, V>,
) -> Result<Vec<(K, V)>, aya::maps::MapError> {
    use std::os::fd::AsFd as _;
    read_all(map.map().fd().as_fd()).map_err(|io_error| {
        aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error,
        })
    })
}
