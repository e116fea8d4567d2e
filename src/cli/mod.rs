//! The binary's side of the command line: argument shapes, one function per subcommand, the
//! rendering of the library's typed events, signals and exit codes. The library never prints;
//! everything a person reads is written here.
//!
//! # Layout
//! - [`args`]: clap's view of the command line.
//! - [`error`]: [`error::CliError`] and its exit codes (2 usage/config, 1 run time).
//! - [`folder`]: `share`, `clone`, `sync`: run a folder node and say what it is doing.
//! - [`render`]: progress bar on a terminal, change lines off one.
//! - [`status`]: `status DIR`, `log DIR`.
//! - [`daemon`]: `daemon`, and `status`/`add`/`remove` against a running daemon.
//! - [`feed`]: `feed create|append|info|verify|sync`.
//! - [`signals`]: SIGINT/SIGTERM/SIGHUP into channels; a second stop exits 130.

pub mod args;
pub mod daemon;
pub mod devices;
pub mod error;
pub mod feed;
pub mod folder;
pub mod reach;
pub mod render;
pub mod signals;
pub mod status;

use args::{Cli, Command, FeedCommand};
use error::CliError;

/// Runs one parsed command.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Share { dir, kind, net } => folder::share(&dir, kind, &net),
        Command::Clone {
            url,
            dir,
            adopt,
            perms,
            net,
            once,
        } => {
            folder::set_umask(perms)?;
            folder::clone(&url, &dir, adopt, &net, once)
        }
        Command::Join {
            url,
            dir,
            adopt,
            kind,
            perms,
            net,
            once,
        } => {
            folder::set_umask(perms)?;
            folder::join(&url, &dir, adopt, kind, &net, once)
        }
        Command::Allow { dir, device } => devices::change(&dir, &device, true),
        Command::Deny { dir, device } => devices::change(&dir, &device, false),
        Command::Devices { dir, json } => devices::list(&dir, json),
        Command::Sync {
            dir,
            kind,
            perms,
            net,
            once,
        } => {
            folder::set_umask(perms)?;
            folder::sync(&dir, kind, &net, once)
        }
        Command::Status {
            dir: Some(dir),
            json,
            ..
        } => status::folder(&dir, json),
        Command::Status {
            dir: None,
            json,
            state_dir,
        } => daemon::status(json, state_dir),
        Command::Daemon { config, state_dir } => daemon::run(config.as_deref(), state_dir),
        Command::Add {
            dir,
            url,
            state_dir,
        } => daemon::add(&dir, url, state_dir),
        Command::Remove { dir, state_dir } => daemon::remove(&dir, state_dir),
        Command::Log { dir } => status::log(&dir),
        Command::Relay {
            listen,
            max_connections,
            max_per_ip,
            rate,
            idle,
        } => reach::relay(
            listen,
            feedsync::reach::relay::RelayLimits {
                max_connections,
                max_per_ip,
                rate,
                idle: std::time::Duration::from_secs(idle),
                ..Default::default()
            },
        ),
        Command::DhtNode { listen, bootstrap } => reach::dht_node(listen, &bootstrap),
        Command::Feed(FeedCommand::Create { store }) => feed::create(&store),
        Command::Feed(FeedCommand::Append {
            store,
            file,
            block_size,
        }) => feed::append(&store, file, block_size),
        Command::Feed(FeedCommand::Info { store }) => feed::info(&store),
        Command::Feed(FeedCommand::Verify { store }) => feed::verify(&store),
        Command::Feed(FeedCommand::Sync {
            store,
            key,
            listen,
            peers,
            once,
        }) => feed::sync(&store, key, listen, &peers, once),
    }
}
