//! The daemon's use of the C allocator. keter mostly waits, with bursts of allocation while
//! it deploys (unpack buffers, YAML, templates); glibc keeps what those bursts freed unless
//! told otherwise, which doubled the resident memory of a daemon running 200 apps.

use std::sync::atomic::{AtomicUsize, Ordering};

/// glibc gives threads their own malloc arenas (up to eight per core), each keeping freed
/// memory; two are plenty for a daemon that mostly waits. Call before starting threads.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator setting; called before the worker threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Marks a burst of allocation (a deploy): when the last running one ends, the free memory of
/// every arena goes back to the system. Trimming after each of 200 simultaneous deploys took up
/// to 400 ms under the arenas' locks (3 ms at the 90th percentile); once at the end of that
/// burst it took 1.6 ms. Without it, 14 of the 30 MB resident after 200 deploys were freed memory that
/// glibc kept.
pub struct Burst(());

static BURSTS: AtomicUsize = AtomicUsize::new(0);

pub fn burst() -> Burst {
    BURSTS.fetch_add(1, Ordering::AcqRel);
    Burst(())
}

impl Drop for Burst {
    fn drop(&mut self) {
        if BURSTS.fetch_sub(1, Ordering::AcqRel) == 1 {
            release_free();
        }
    }
}

fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only returns free pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
    release_binary();
}

/// Unmaps from the process the pages of keter's own binary that are read-only: its code and
/// read-only data (never its writable segment, which holds what the dynamic linker relocated).
/// They stay in the page cache; the next use of a page maps it again (a minor fault, with
/// the pages around it). A deploy runs code that an idle daemon does not (unpacking, YAML,
/// templates, process starts), and the kernel maps the pages around each page touched: what
/// a burst mapped stayed mapped: 6.7 MB of the binary 3 s after 50 apps deployed at once,
/// 3.9 MB when given back (`cargo bench --bench figures many`, column "binary").
pub fn release_binary() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: the callback only reads the program headers dl_iterate_phdr hands it.
    unsafe {
        libc::dl_iterate_phdr(Some(release_segments), std::ptr::null_mut());
    }
}

/// Called by `dl_iterate_phdr` for each loaded object, the program first; stops after it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe extern "C" fn release_segments(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    _data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: dl_iterate_phdr passes a valid `info` whose `dlpi_phdr` has `dlpi_phnum`
    // entries. The ranges given to madvise are whole pages inside segments mapped without
    // write permission: private file mappings nobody wrote, whose pages read back from the
    // file exactly as they were.
    unsafe {
        let info = &*info;
        let page = libc::sysconf(libc::_SC_PAGESIZE).max(4096) as usize;
        let headers = std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum));
        for h in headers {
            if h.p_type != libc::PT_LOAD || h.p_flags & libc::PF_W != 0 {
                continue;
            }
            let start = (info.dlpi_addr as usize + h.p_vaddr as usize).next_multiple_of(page);
            let end = (info.dlpi_addr as usize + (h.p_vaddr + h.p_memsz) as usize) & !(page - 1);
            if end > start {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
    // The program is the first object: the shared libraries are left alone.
    1
}

/// Below the stack pointer, what the calling thread's stack keeps: the red zone and the
/// frames of the call that releases.
const STACK_KEPT: usize = 2 * 1024;

/// Gives back to the system the pages of the calling thread's stack below the current frame
/// (less [`STACK_KEPT`]), as glibc does for a thread that ends. An app worker touches most of
/// its stack only while a deploy runs (starting its processes, writing its record, logging);
/// once the deploy is over those pages would stay resident for as long as the app runs. Call it from the shallowest frame the thread has. Pages
/// touched again later come back as zeros, which is all a stack below its pointer may hold.
/// Never inlined: its own small frame must lie below every frame of its caller, so that the
/// pages it drops hold none of the caller's locals.
#[inline(never)]
pub fn release_stack() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let here = 0u8;
        let sp = std::ptr::addr_of!(here) as usize;
        // SAFETY: pthread_getattr_np fills `attr` for the calling thread; it is destroyed
        // after use. madvise(MADV_DONTNEED) on private anonymous memory that lies below the
        // stack pointer, minus a margin, drops only pages no live frame uses.
        unsafe {
            let mut attr: libc::pthread_attr_t = std::mem::zeroed();
            if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
                return;
            }
            let mut low: *mut libc::c_void = std::ptr::null_mut();
            let mut size: libc::size_t = 0;
            let got = libc::pthread_attr_getstack(&attr, &mut low, &mut size);
            libc::pthread_attr_destroy(&mut attr);
            let page = libc::sysconf(libc::_SC_PAGESIZE).max(4096) as usize;
            let low = low as usize;
            if got != 0 || sp < low + STACK_KEPT || sp >= low + size {
                return;
            }
            // Page-aligned, from the lowest page of the stack (its guard is below `low`).
            let start = low.next_multiple_of(page);
            let end = (sp - STACK_KEPT) & !(page - 1);
            if end > start {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Touches `depth` KiB of stack and returns a value computed from all of it.
    fn deep(depth: usize) -> u64 {
        let frame = [depth as u8; 1024];
        let below = if depth > 0 { deep(depth - 1) } else { 0 };
        std::hint::black_box(&frame)
            .iter()
            .map(|b| u64::from(*b))
            .sum::<u64>()
            + below
    }

    /// KiB of the running binary's pages mapped (code, read-only data, its writable segment).
    fn binary_resident() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_str().unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut ours = false;
        let mut kib = 0;
        for line in smaps.lines() {
            if let Some(v) = line.strip_prefix("Rss:") {
                if ours {
                    kib += v.split_whitespace().next().unwrap().parse::<u64>().unwrap();
                }
            } else if !line.split_whitespace().next().unwrap_or("").ends_with(':') {
                ours = line.split_whitespace().nth(5) == Some(exe);
            }
        }
        kib
    }

    #[test]
    fn a_released_binary_keeps_working() {
        let before = binary_resident();
        super::release_binary();
        let after = binary_resident();
        // Other tests run meanwhile and map some pages again; most stay unmapped.
        assert!(
            after < before / 2,
            "{before} KiB mapped before, {after} KiB after"
        );
        // The code runs from the file's pages again.
        assert_eq!(deep(100), deep(100));
        assert!(binary_resident() > 0);
    }

    #[test]
    fn a_released_stack_keeps_working() {
        std::thread::spawn(|| {
            let before = deep(200);
            super::release_stack();
            // The frames above are intact and the released pages are used again.
            assert_eq!(deep(200), before);
            super::release_stack();
        })
        .join()
        .unwrap();
    }
}
