//! The process's signals belong to the binary: the library only selects over a channel. The
//! first SIGINT/SIGTERM asks for the ordered shutdown; a second one exits at once with status
//! 130 (nothing verified is lost: every stored block was written before it was announced).
//! SIGHUP, where asked for, means "reload".

use crossbeam_channel::Receiver;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::io;

/// What a signal asks for.
enum Asked {
    Stop,
    Reload,
}

/// Starts the thread that turns signals into `deliver` calls, and exits on a second stop.
fn forward(with_reload: bool, deliver: impl Fn(Asked) -> bool + Send + 'static) -> io::Result<()> {
    let mut wanted = vec![SIGINT, SIGTERM];
    if with_reload {
        wanted.push(SIGHUP);
    }
    let mut signals = signal_hook::iterator::Signals::new(&wanted)?;
    std::thread::Builder::new()
        .name("feedsync-signals".into())
        .spawn(move || {
            let mut stopping = false;
            for s in signals.forever() {
                let asked = if s == SIGHUP {
                    Asked::Reload
                } else {
                    Asked::Stop
                };
                if matches!(asked, Asked::Stop) {
                    if stopping {
                        std::process::exit(130);
                    }
                    stopping = true;
                }
                if !deliver(asked) {
                    break;
                }
            }
        })?;
    Ok(())
}

/// For a node: a message on the returned channel starts its ordered shutdown.
pub fn stop_channel() -> io::Result<Receiver<()>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    forward(false, move |_| {
        let _ = tx.try_send(());
        true
    })?;
    Ok(rx)
}

/// For the daemon: stops and reloads.
pub fn daemon_channel() -> io::Result<Receiver<feedsync::daemon::DaemonSignal>> {
    use feedsync::daemon::DaemonSignal;
    let (tx, rx) = crossbeam_channel::bounded(4);
    forward(true, move |asked| {
        let s = match asked {
            Asked::Stop => DaemonSignal::Stop,
            Asked::Reload => DaemonSignal::Reload,
        };
        tx.send(s).is_ok()
    })?;
    Ok(rx)
}
