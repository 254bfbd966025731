//! The module's allocator: power-of-two size classes, a free list per class, a bump
//! pointer for fresh blocks. No splitting, no coalescing, O(1) for every call.
//!
//! Measured against the crates (README, "Size and speed"): talc cost about 2 KB of the
//! gzipped module and lol_alloc's free-list search a quarter of `track()`'s time; this is
//! 1.4 KB smaller gzipped and as fast as talc in `cargo xtask bench sdk`. What it gives up is reuse across sizes: a freed
//! block only serves requests of its own class, so a page's heap is at most the sum of
//! each class's peak, and never more than twice the bytes live at those peaks. The
//! module's allocations are small and repetitive (event records, ids, batch bodies under
//! 64 KB), so the heap settles after the first batches: 200,000 events of varied sizes
//! through a 5,000-event queue in headless Chromium left the module's memory at 12 MiB
//! from the first 20,000 on (8 MiB with talc).

use core::alloc::Layout;

/// Blocks are aligned to this (the largest alignment of the module's types); a request
/// for more is served from fresh memory and never reused.
const ALIGN: usize = 16;
const CLASSES: usize = usize::BITS as usize;

/// Where fresh memory comes from: `grow(bytes)` returns the start and length of at least
/// `bytes` new bytes (in wasm, whole pages from `memory.grow`), or `None`.
pub trait Grow {
    fn grow(&mut self, bytes: usize) -> Option<(usize, usize)>;
}

pub struct Heap<G> {
    /// Head of each class's free list (0: empty); a free block's first word links the next.
    free: [usize; CLASSES],
    next: usize,
    end: usize,
    source: G,
}

/// The class of a request: blocks of class `c` are `1 << c` bytes.
fn class(size: usize) -> usize {
    (usize::BITS - (size.max(ALIGN) - 1).leading_zeros()) as usize
}

impl<G: Grow> Heap<G> {
    pub const fn new(source: G) -> Self {
        Heap {
            free: [0; CLASSES],
            next: 0,
            end: 0,
            source,
        }
    }

    /// # Safety
    /// As `GlobalAlloc::alloc`.
    pub unsafe fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let c = class(layout.size());
        if layout.align() <= ALIGN {
            let head = self.free[c];
            if head != 0 {
                // SAFETY: `head` is a free block of this class; its first word is the link.
                self.free[c] = unsafe { *(head as *const usize) };
                return head as *mut u8;
            }
        }
        let Some(size) = 1usize.checked_shl(c as u32) else {
            return core::ptr::null_mut();
        };
        let align = layout.align().max(ALIGN);
        let fits = |next: usize, end: usize| {
            let at = next.checked_add(align - 1)? & !(align - 1);
            (at.checked_add(size)? <= end).then_some(at)
        };
        let at = match fits(self.next, self.end) {
            Some(at) => at,
            None => {
                let Some((start, len)) = size.checked_add(align).and_then(|n| self.source.grow(n))
                else {
                    return core::ptr::null_mut();
                };
                if start != self.end {
                    // Not contiguous with the old region (or the first one): start afresh.
                    self.next = start;
                }
                self.end = start + len;
                match fits(self.next, self.end) {
                    Some(at) => at,
                    None => return core::ptr::null_mut(),
                }
            }
        };
        self.next = at + size;
        at as *mut u8
    }

    /// # Safety
    /// As `GlobalAlloc::dealloc`.
    pub unsafe fn dealloc(&mut self, ptr: *mut u8, layout: Layout) {
        if layout.align() > ALIGN {
            return;
        }
        let c = class(layout.size());
        // SAFETY: the block is at least `ALIGN` bytes and no longer in use.
        unsafe { *(ptr as *mut usize) = self.free[c] };
        self.free[c] = ptr as usize;
    }

    /// # Safety
    /// As `GlobalAlloc::realloc`.
    pub unsafe fn realloc(&mut self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if class(new_size) == class(layout.size()) && layout.align() <= ALIGN {
            return ptr;
        }
        // SAFETY: as the caller's contract; the new block is at least `new_size` bytes.
        unsafe {
            let new = self.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
            if !new.is_null() {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(target_arch = "wasm32")]
pub mod wasm {
    use super::{Grow, Heap};
    use core::alloc::{GlobalAlloc, Layout};
    use core::cell::UnsafeCell;

    pub struct Pages;

    impl Grow for Pages {
        fn grow(&mut self, bytes: usize) -> Option<(usize, usize)> {
            let pages = bytes.div_ceil(65536);
            let old = core::arch::wasm32::memory_grow(0, pages);
            (old != usize::MAX).then(|| (old * 65536, pages * 65536))
        }
    }

    pub struct Global(UnsafeCell<Heap<Pages>>);

    impl Global {
        pub const fn new() -> Self {
            Global(UnsafeCell::new(Heap::new(Pages)))
        }
    }

    // SAFETY: wasm32 in the browser runs this module on one thread.
    unsafe impl Sync for Global {}

    // SAFETY: `Heap` hands out disjoint blocks of at least the requested size and
    // alignment; one thread, and no allocator call re-enters another.
    unsafe impl GlobalAlloc for Global {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            unsafe { (*self.0.get()).alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { (*self.0.get()).dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            unsafe { (*self.0.get()).realloc(ptr, layout, new_size) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Fresh memory from one big host buffer, `chunk` bytes at a time at least.
    struct Buffer {
        mem: Vec<u128>,
        used: usize,
        chunk: usize,
    }

    impl Grow for Buffer {
        fn grow(&mut self, bytes: usize) -> Option<(usize, usize)> {
            let len = bytes.div_ceil(self.chunk) * self.chunk;
            let base = self.mem.as_ptr() as usize;
            if self.used + len > self.mem.len() * 16 {
                return None;
            }
            let start = base + self.used;
            self.used += len;
            Some((start, len))
        }
    }

    fn heap(chunk: usize) -> Heap<Buffer> {
        Heap::new(Buffer {
            mem: vec![0; 4 << 20],
            used: 0,
            chunk,
        })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(usize, usize),
        Free(usize),
        Realloc(usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let size = prop_oneof![1usize..64, 1usize..4096, 1usize..200_000];
        prop_oneof![
            (size.clone(), 0usize..6).prop_map(|(s, a)| Op::Alloc(s, 1 << a)),
            any::<usize>().prop_map(Op::Free),
            (any::<usize>(), size).prop_map(|(i, s)| Op::Realloc(i, s)),
        ]
    }

    fn fill(ptr: *mut u8, len: usize, tag: u8) {
        unsafe { core::ptr::write_bytes(ptr, tag, len) };
    }

    fn holds(ptr: *mut u8, len: usize, tag: u8) -> bool {
        unsafe { core::slice::from_raw_parts(ptr, len) }
            .iter()
            .all(|&b| b == tag)
    }

    proptest! {
        /// Live blocks are aligned and disjoint (each keeps its own fill), and realloc
        /// keeps the contents, over arbitrary sequences of calls.
        #[test]
        fn blocks_are_aligned_disjoint_and_kept(ops in proptest::collection::vec(op(), 1..300)) {
            let mut h = heap(65536);
            let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
            let mut tag = 0u8;
            for op in ops {
                match op {
                    Op::Alloc(size, align) => {
                        let l = Layout::from_size_align(size, align).unwrap();
                        let p = unsafe { h.alloc(l) };
                        prop_assert!(!p.is_null());
                        prop_assert_eq!(p as usize % align, 0);
                        tag = tag.wrapping_add(1);
                        fill(p, size, tag);
                        live.push((p, l, tag));
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let (p, l, t) = live.swap_remove(i % live.len());
                        prop_assert!(holds(p, l.size(), t), "a block was overwritten");
                        unsafe { h.dealloc(p, l) };
                    }
                    Op::Realloc(i, size) if !live.is_empty() => {
                        let i = i % live.len();
                        let (p, l, t) = live[i];
                        prop_assert!(holds(p, l.size(), t), "a block was overwritten");
                        let q = unsafe { h.realloc(p, l, size) };
                        prop_assert!(!q.is_null());
                        prop_assert_eq!(q as usize % l.align(), 0);
                        prop_assert!(holds(q, l.size().min(size), t), "realloc lost the contents");
                        fill(q, size, t);
                        live[i] = (q, Layout::from_size_align(size, l.align()).unwrap(), t);
                    }
                    _ => {}
                }
            }
            for (p, l, t) in live {
                prop_assert!(holds(p, l.size(), t), "a block was overwritten");
            }
        }
    }

    #[test]
    fn freed_blocks_are_reused_by_their_class() {
        let mut h = heap(65536);
        let l = Layout::from_size_align(100, 8).unwrap();
        let a = unsafe { h.alloc(l) };
        unsafe { h.dealloc(a, l) };
        // 65..=128 bytes is one class.
        let b = unsafe { h.alloc(Layout::from_size_align(120, 4).unwrap()) };
        assert_eq!(a, b);
        let c = unsafe { h.alloc(l) };
        assert_ne!(c, b, "a live block is not handed out twice");
    }

    #[test]
    fn realloc_within_the_class_stays_in_place() {
        let mut h = heap(65536);
        let l = Layout::from_size_align(70, 1).unwrap();
        let a = unsafe { h.alloc(l) };
        assert_eq!(unsafe { h.realloc(a, l, 128) }, a);
        assert_ne!(
            unsafe { h.realloc(a, Layout::from_size_align(128, 1).unwrap(), 129) },
            a
        );
    }

    #[test]
    fn out_of_memory_is_null_not_a_panic() {
        let mut h = heap(65536);
        let huge = Layout::from_size_align(1 << 40, 8).unwrap();
        assert!(unsafe { h.alloc(huge) }.is_null());
        let over = Layout::from_size_align(isize::MAX as usize - 16, 1).unwrap();
        assert!(unsafe { h.alloc(over) }.is_null());
    }
}
