//! Whether this machine's kernel has SCTP: the SCTP lab test needs real SCTP sockets, and is
//! ignored, with the reason in the test output, on a kernel built without them
//! (CONFIG_IP_SCTP not set), as the kernels of the project's CI machines are.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kernel_without_sctp)");
    println!("cargo::rerun-if-changed=build.rs");
    // SAFETY: plain socket(2); the descriptor is closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd < 0 {
        println!("cargo::rustc-cfg=kernel_without_sctp");
    } else {
        // SAFETY: the descriptor this function opened.
        unsafe { libc::close(fd) };
    }
}
