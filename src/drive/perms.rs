//! Permission bits of the files a reader publishes: the writer's bits (a record carries
//! `mode & 0o777`), less a umask, so a private `0600` file stays private and the user decides
//! how much more to take away.
//!
//! The umask is a property of the process, and is treated as one: by default the umask the
//! process was started with; `feedsync clone/sync --umask OCTAL` sets the process umask (before
//! any thread exists) and that is used from then on. It is read once from
//! `/proc/self/status`, not with `umask(2)`, which can only read it by changing it, for a
//! moment, for every thread creating files.

use std::sync::OnceLock;

static UMASK: OnceLock<u32> = OnceLock::new();

/// When the process umask cannot be read: the usual one.
const FALLBACK: u32 = 0o022;

/// The umask published files get.
pub fn umask() -> u32 {
    *UMASK.get_or_init(process_umask)
}

/// Sets the process umask to `mask` (only its permission bits) and publishes with it from now
/// on. Meant for the start of `main`, before any thread runs. `Err` with the umask in force if
/// one was already fixed for this process.
pub fn set_umask(mask: u32) -> Result<(), u32> {
    let mask = mask & 0o777;
    if let Some(&old) = UMASK.get() {
        return if old == mask { Ok(()) } else { Err(old) };
    }
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(mask));
    UMASK.set(mask).map_err(|_| umask())
}

/// The mode to publish a file recorded with `mode` under.
pub fn file_mode(mode: u32) -> u32 {
    mode & 0o777 & !umask()
}

/// The process umask from `/proc/self/status` (Linux 4.7+), else [`FALLBACK`].
fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(FALLBACK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_umask_is_read_without_changing_it() {
        let read = process_umask();
        assert!(read <= 0o777);
        // Reading twice gives the same (it was not reset to 0 by the first read).
        assert_eq!(process_umask(), read);
        assert_eq!(0o640 & !0o027, 0o640 & 0o777 & !0o027);
    }
}
