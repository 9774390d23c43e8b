//! Cache prefetch hints for the fan-out.
//!
//! A fan-out's time per recipient is mostly a write system call; in user space it is mostly
//! cache misses on the recipient's connection handle, whose lines the system calls in between
//! have evicted (perf annotate: the first load from each handle holds most of the loop's
//! samples). Asking for the next recipient's handle before writing to this one overlaps that
//! miss with the system call.

use std::sync::Arc;

use crate::outbound::ConnHandle;

/// Asks the CPU to bring `conn`'s handle into cache. A hint only: no effect on memory.
#[inline]
pub fn handle(conn: &Arc<ConnHandle>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let start: *const ConnHandle = Arc::as_ptr(conn);
        let start = start.cast::<i8>();
        let size = std::mem::size_of::<ConnHandle>();
        // Every line the handle overlaps: one address per 64 bytes, and its last byte.
        for at in (0..size).step_by(64).chain([size - 1]) {
            // SAFETY: a prefetch never faults and has no memory effects; `wrapping_add`
            // keeps the address computation defined. SSE is part of x86_64's baseline.
            #[allow(unsafe_code)]
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(at));
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = conn;
}
