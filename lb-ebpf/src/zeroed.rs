//! Zeroing and writing whole values a word at a time, where they live. Volatile stores of
//! whole words are never merged by LLVM into a `memset` or moved values into a `memmove`, and
//! the verifier walks fewer instructions for them than for LLVM's inline expansion of the
//! same (lb_xdp 301,907 against 318,737, lb_xdp_sctp 503,864 against 545,494 when `zero` was
//! `ptr::write_bytes`). With bpf-linker's default in-order memcpy expansion (turned off in
//! lb-ebpf/build.rs) such a `memset` would be a call to a loop of byte stores.
use core::mem::{MaybeUninit, align_of, size_of};

use aya_ebpf::bindings::bpf_fib_lookup;
use lb_common::{CtAddr, CtKey, CtValue, monitor::MonitorEvent};

/// A type for which all bits zero is a valid value, its size a whole number of 4-byte words,
/// 4-byte aligned at least.
///
/// # Safety
/// All bits zero must be a valid value of the type.
pub unsafe trait Zeroable: Sized {}

// SAFETY: integers and arrays of integers only.
unsafe impl<A: CtAddr> Zeroable for CtValue<A> {}
// SAFETY: integers and arrays of integers only.
unsafe impl<A: CtAddr> Zeroable for CtKey<A> {}
// SAFETY: integers and arrays of integers only.
unsafe impl Zeroable for MonitorEvent {}
// SAFETY: integers, arrays of integers and unions of them only; all zero is a request without
// options (include/uapi/linux/bpf.h).
unsafe impl Zeroable for bpf_fib_lookup {}

/// Zeroes `slot` where it is and hands it back initialised. A zeroed value must not be moved
/// afterwards: LLVM knows the bytes a move copies are zero and writes them with plain stores,
/// which it merges into a `memset` again.
#[inline(always)]
pub fn zero_init<T: Zeroable>(slot: &mut MaybeUninit<T>) -> &mut T {
    // SAFETY: slot is valid for writes of a T and aligned for it; all zero is a valid T
    // (Zeroable).
    unsafe {
        zero(slot.as_mut_ptr());
        slot.assume_init_mut()
    }
}

/// Writes `value` over `*slot`, a word at a time: a plain copy of a value LLVM knows has zero
/// fields (a struct literal ending in `..Default::default()`) writes those with a `memset`.
///
/// # Safety
/// `slot` must be valid for writes of a `T` and aligned for it.
#[inline(always)]
pub unsafe fn write_words<T: Zeroable>(slot: *mut T, value: &T) {
    const {
        assert!(align_of::<T>() >= 8 && size_of::<T>().is_multiple_of(8));
    }
    let words = slot.cast::<u64>();
    let values = core::ptr::from_ref(value).cast::<u64>();
    for index in 0..size_of::<T>() / 8 {
        // SAFETY: both within their T (the caller's promise for slot), 8-byte aligned as T is.
        unsafe { words.add(index).write_volatile(values.add(index).read()) };
    }
}

/// Writes zero over every byte of `*slot`, a word at a time.
///
/// # Safety
/// `slot` must be valid for writes of a `T` and aligned for it.
#[inline(always)]
pub unsafe fn zero<T: Zeroable>(slot: *mut T) {
    const {
        assert!(align_of::<T>() >= 4 && size_of::<T>().is_multiple_of(4));
    }
    if align_of::<T>() >= 8 && size_of::<T>().is_multiple_of(8) {
        let words = slot.cast::<u64>();
        for index in 0..size_of::<T>() / 8 {
            // SAFETY: within *slot (the caller's promise), 8-byte aligned as T is.
            unsafe { words.add(index).write_volatile(0) };
        }
    } else {
        let words = slot.cast::<u32>();
        for index in 0..size_of::<T>() / 4 {
            // SAFETY: within *slot, 4-byte aligned as T is.
            unsafe { words.add(index).write_volatile(0) };
        }
    }
}
