//! The `feedsync` command line. Thin by design: it parses arguments and calls the library.

use clap::{Parser, Subcommand};
use feedsync::core::{Feed, crypto};
use feedsync::storage::DiskStorage;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

/// Peer-to-peer replicated feeds and folders.
#[derive(Parser)]
#[command(name = "feedsync", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with a single feed store (low-level; folders come later).
    #[command(subcommand)]
    Feed(FeedCommand),
}

#[derive(Subcommand)]
enum FeedCommand {
    /// Create a new writable feed in STORE and print its public key.
    Create {
        /// Directory for the feed store (created if missing, must not hold a feed).
        store: PathBuf,
    },
    /// Append FILE (or standard input) to the feed, split into blocks of BLOCK_SIZE bytes.
    Append {
        /// The feed store.
        store: PathBuf,
        /// File to append; standard input when absent.
        file: Option<PathBuf>,
        /// Block size in bytes.
        #[arg(long, default_value_t = 65536)]
        block_size: usize,
    },
    /// Print the feed's keys, length and blocks held.
    Info {
        /// The feed store.
        store: PathBuf,
    },
    /// Re-verify every held block and tree node against the signed tree.
    Verify {
        /// The feed store.
        store: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("feedsync: {e}");
            ExitCode::FAILURE
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Feed(FeedCommand::Create { store }) => {
            let feed = Feed::create(DiskStorage::open(&store)?, crypto::generate_key())?;
            println!("{}", hex(&feed.public_key()));
        }
        Command::Feed(FeedCommand::Append {
            store,
            file,
            block_size,
        }) => {
            if block_size == 0 || block_size > feedsync::protocol::MAX_BLOCK_LEN {
                return Err(format!(
                    "--block-size must be between 1 and {}",
                    feedsync::protocol::MAX_BLOCK_LEN
                )
                .into());
            }
            let mut feed = Feed::open(DiskStorage::open(&store)?)?;
            let mut input: Box<dyn Read> = match file {
                Some(path) => Box::new(
                    std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?,
                ),
                None => Box::new(std::io::stdin().lock()),
            };
            let mut buf = vec![0u8; block_size];
            loop {
                let mut filled = 0;
                while filled < block_size {
                    match input.read(&mut buf[filled..])? {
                        0 => break,
                        n => filled += n,
                    }
                }
                if filled == 0 {
                    break;
                }
                feed.append(&buf[..filled])?;
                if filled < block_size {
                    break;
                }
            }
            feed.sync()?;
            println!("{}", feed.len());
        }
        Command::Feed(FeedCommand::Info { store }) => {
            let feed = Feed::open(DiskStorage::open(&store)?)?;
            println!("public key:    {}", hex(&feed.public_key()));
            println!("discovery key: {}", hex(&feed.discovery_key()));
            println!("writable:      {}", feed.is_writable());
            println!(
                "length:        {} blocks, {} bytes",
                feed.len(),
                feed.byte_len()
            );
            println!("held:          {} blocks", feed.bitfield().count());
        }
        Command::Feed(FeedCommand::Verify { store }) => {
            let mut feed = Feed::open(DiskStorage::open(&store)?)?;
            feed.verify_all()?;
            println!("ok: {} blocks verified", feed.bitfield().count());
        }
    }
    Ok(())
}
