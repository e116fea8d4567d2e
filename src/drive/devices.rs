//! Who may write a folder (#13): this device's identity, `allow`, `deny` and `devices`.
//!
//! A device's id is the public key of its own metadata feed for the folder; the founder's is the
//! folder's key. A device that `join`s gets its own pair of feeds (`.feedsync/device-meta`,
//! `.feedsync/device-content`, created once, kept across restarts), so its id never changes.
//! Membership is signed history: `allow`/`deny` append a [`Record::Allow`]/[`Record::Deny`] to
//! this device's writable metadata feed, and `devices` replays the feeds held through
//! [`Merge`] (the one rule every device applies).
//!
//! # Reaching a running node
//! A node serving the folder holds its stores' locks. `allow`/`deny` then leave a request in
//! `.feedsync/requests/` (the state directory is ours alone: see `dirs.rs`) and wait, with a
//! deadline, for the answer beside it; the running writer picks requests up every
//! [`REQUEST_POLL`] (`take_requests`), appends the record with its own feed handle and answers.
//! With nothing serving the folder the command opens the store and appends itself. Either way the
//! block is flushed before the command says it is done.

use super::merge::{DeviceId, Merge};
use super::record::{self, Limits, Record};
use super::{Drive, DriveError, STATE_DIR, dirs};
use crate::core::Feed;
use crate::fsio::Dir;
use crate::storage::DiskStorage;
use crate::util::hex;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// Where requests to a running node wait, inside the state directory.
pub const REQUESTS_DIR: &str = "requests";

/// How often a running writer looks for requests.
pub const REQUEST_POLL: Duration = Duration::from_millis(200);

/// Requests taken per look (a flood of files in our own state directory is bounded too).
const MAX_REQUESTS_PER_POLL: usize = 16;

/// Largest request file read.
const MAX_REQUEST_BYTES: u64 = 4096;

/// A change of who may write.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Change {
    /// Let a device write.
    Allow {
        /// Its id, as hex.
        #[serde(with = "hex_key")]
        device: DeviceId,
    },
    /// Stop counting what a device writes from now on.
    Deny {
        /// Its id, as hex.
        #[serde(with = "hex_key")]
        device: DeviceId,
    },
}

/// What a change did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Outcome {
    /// Recorded in this device's feed at this version.
    Recorded {
        /// The metadata version that carries it.
        version: u64,
    },
    /// Nothing to record: the device already is (or is not) a member.
    Unchanged,
    /// Refused, and why.
    Refused {
        /// For the user.
        why: String,
    },
}

/// One device of a folder, as `devices` lists it.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its id, hex.
    pub device: String,
    /// The device that founded the folder (its key is the folder's URL).
    pub founder: bool,
    /// This device.
    pub this: bool,
    /// Allowed to write (a denied device stays allowed for its first `denied_after` blocks).
    pub allowed: bool,
    /// Denied: only its first this many blocks count.
    pub denied_after: Option<u64>,
}

/// Parses a device id (64 hex digits, or a `feedsync://` URL of a founder).
pub fn parse_device(text: &str) -> Result<DeviceId, DriveError> {
    super::parse_url(text).or_else(|_| super::parse_url(&format!("feedsync://{text}")))
}

/// This device's id in the folder at `root`: its own device feed's key if it joined, the
/// founder's if it holds the folder's writable feed, `None` for a plain clone.
pub fn this_device(root: &Path) -> Result<Option<DeviceId>, DriveError> {
    let state = root.join(STATE_DIR);
    for (store, need_secret) in [("device-meta", false), ("meta", true)] {
        let dir = state.join(store);
        if !dir.join("header").exists() || (need_secret && !dir.join("secret_key").exists()) {
            continue;
        }
        let feed = Feed::open(DiskStorage::open_read_only(&dir)?)?;
        return Ok(Some(feed.public_key()));
    }
    Ok(None)
}

/// Makes this device's own feeds for the folder (`join`), or finds the ones made before;
/// returns the device id. The feeds start with the usual `Init` and are flushed.
pub(crate) fn ensure_device(state: &dyn Dir, root: &Path) -> Result<DeviceId, DriveError> {
    if state.metadata("device-meta/header")?.is_some() {
        let (store, _lock) = dirs::open_store(state, root, "device-meta", false, None)?;
        return Ok(Feed::open(store)?.public_key());
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| io::Error::other(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    let ckey = super::content_key(&seed);
    // Content first: a device-meta header is what says the device exists.
    let (cstore, _clock) = dirs::open_store(state, root, "device-content", true, None)?;
    let mut content = Feed::create(cstore, ckey.clone())?;
    content.sync()?;
    let (mstore, _mlock) = dirs::open_store(state, root, "device-meta", true, None)?;
    let mut meta = Feed::create(mstore, key)?;
    meta.append(&record::encode(&[
        Record::Init {
            content_key: ckey.verifying_key().to_bytes(),
            block_size: record::BLOCK_SIZE as u32,
        },
        Record::now(),
    ]))?;
    meta.sync()?;
    Ok(meta.public_key())
}

/// The merge of the metadata feeds held in `root`, read without any lock (beside a running
/// node, like `log`): the folder's feed, and this device's own if it joined.
fn merged(root: &Path) -> Result<Merge, DriveError> {
    let state = root.join(STATE_DIR);
    if !state.join("meta/header").exists() {
        return Err(DriveError::NotADrive(root.to_path_buf()));
    }
    let mut feeds = vec![Feed::open(DiskStorage::open_read_only(
        state.join("meta"),
    )?)?];
    if state.join("device-meta/header").exists() {
        feeds.push(Feed::open(DiskStorage::open_read_only(
            state.join("device-meta"),
        )?)?);
    }
    // Other devices' feeds a running two-way node opened (`twoway.rs`), in a fixed order.
    if let Ok(dir) = std::fs::read_dir(state.join("devices")) {
        let mut names: Vec<_> = dir.filter_map(Result::ok).map(|e| e.path()).collect();
        names.sort();
        for d in names.into_iter().take(super::merge::MAX_DEVICES) {
            if d.join("meta/header").exists()
                && let Ok(store) = DiskStorage::open_read_only(d.join("meta"))
                && let Ok(feed) = Feed::open(store)
            {
                feeds.push(feed);
            }
        }
    }
    // A merge that needs a rebuild (a denial that arrived late) still has the members right:
    // they come from every membership record it holds, whatever the tree says.
    Ok(merge_feeds(&mut feeds))
}

/// The merge of `feeds` (the first one the founder's): each in order, as far as it is held
/// and applies; a device waiting on another's history is offered again once that one moved.
fn merge_feeds(feeds: &mut [Feed<DiskStorage>]) -> Merge {
    let mut m = Merge::new(feeds[0].public_key(), Limits::default());
    let mut next = vec![0u64; feeds.len()];
    loop {
        let mut moved = false;
        for (k, feed) in feeds.iter_mut().enumerate() {
            while next[k] < feed.len() && feed.has(next[k]) {
                let i = next[k];
                let Ok(block) = feed.get(i) else { break };
                let Ok(recs) = record::decode(i, &block) else {
                    break;
                };
                match m.offer(feed.public_key(), i, &recs) {
                    Ok(super::merge::Offer::Applied) => {
                        next[k] += 1;
                        moved = true;
                    }
                    _ => break,
                }
            }
        }
        if !moved {
            break;
        }
    }
    m
}

/// `devices DIR`: the founder, every device ever allowed, and which one is this.
pub fn list(root: &Path) -> Result<Vec<DeviceInfo>, DriveError> {
    let root = canonical(root)?;
    let m = merged(&root)?;
    let me = this_device(&root)?;
    let mut out: Vec<DeviceInfo> = m
        .members()
        .list()
        .into_iter()
        .map(|(d, bound)| DeviceInfo {
            device: hex(&d),
            founder: d == m.founder(),
            this: me == Some(d),
            allowed: true,
            denied_after: bound,
        })
        .collect();
    if let Some(me) = me.filter(|me| !m.members().list().iter().any(|(d, _)| d == me)) {
        // A joined device no member has allowed (yet, as far as this device has heard).
        out.push(DeviceInfo {
            device: hex(&me),
            founder: false,
            this: true,
            allowed: false,
            denied_after: None,
        });
    }
    Ok(out)
}

/// `allow`/`deny DIR DEVICE`: recorded by the node serving the folder if one runs (waiting for
/// it at most `wait`), else directly in the store.
pub fn change(root: &Path, change: Change, wait: Duration) -> Result<Outcome, DriveError> {
    let root = canonical(root)?;
    if root.join(STATE_DIR).join("device-meta/header").exists() {
        return change_as_device(&root, change, wait);
    }
    if !root.join(STATE_DIR).join("meta/secret_key").exists() {
        // A clone, or a joined device: no node of it could record this either.
        if !root.join(STATE_DIR).join("meta/header").exists() {
            return Err(DriveError::NotADrive(root));
        }
        return Ok(refuse_reader());
    }
    match Drive::open(&root) {
        Ok(mut drive) => {
            if !drive.writer {
                return Ok(refuse_reader());
            }
            let m = merged(&root)?;
            let Some(recs) = records_for(&m, change) else {
                return Ok(Outcome::Unchanged);
            };
            if let Some(refused) = refusal(&m, change) {
                return Ok(refused);
            }
            let mut block = vec![Record::now()];
            block.extend(recs);
            drive.meta.append(&record::encode(&block))?;
            drive.meta.sync()?;
            Ok(Outcome::Recorded {
                version: drive.meta.len(),
            })
        }
        Err(DriveError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
            ask_running(&root, change, wait)
        }
        Err(e) => Err(e),
    }
}

/// `allow`/`deny` on a joined device: recorded in its own feed, if the members let it write.
fn change_as_device(root: &Path, change: Change, wait: Duration) -> Result<Outcome, DriveError> {
    let root_dir = dirs::open_folder(root)?;
    let state = dirs::open_state(&*root_dir, root, false)?;
    let store = match dirs::open_store(&*state, root, "device-meta", false, None) {
        Ok(s) => s,
        Err(DriveError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
            return ask_running(root, change, wait);
        }
        Err(e) => return Err(e),
    };
    let (store, _lock) = store;
    let mut own = Feed::open(store)?;
    let me = own.public_key();
    let m = merged(root)?;
    if !m.members().may_write(&me) {
        return Ok(refuse_reader());
    }
    if let Some(refused) = refusal(&m, change) {
        return Ok(refused);
    }
    let Some(recs) = records_for(&m, change) else {
        return Ok(Outcome::Unchanged);
    };
    let mut block = vec![
        Record::now(),
        Record::Clock {
            clock: m.clock_for(&me),
        },
    ];
    block.extend(recs);
    own.append(&record::encode(&block))?;
    own.sync()?;
    Ok(Outcome::Recorded { version: own.len() })
}

fn refuse_reader() -> Outcome {
    Outcome::Refused {
        why: "this device may not write to the folder (a clone, or a device not allowed yet); run it on a device that may".into(),
    }
}

/// What a change refuses outright, whoever asks.
fn refusal(m: &Merge, change: Change) -> Option<Outcome> {
    match change {
        Change::Deny { device } if device == m.founder() => Some(Outcome::Refused {
            why: "the founder's device cannot be denied (its key is the folder's URL)".into(),
        }),
        _ => None,
    }
}

/// The records a change needs given the members now (`None`: nothing to do).
fn records_for(m: &Merge, change: Change) -> Option<Vec<Record>> {
    let members = m.members();
    match change {
        Change::Allow { device } => {
            (!members.counts(&device, 1)).then(|| vec![Record::Allow { device }])
        }
        Change::Deny { device } => {
            if device == m.founder() {
                return Some(Vec::new()); // refused by `refusal`
            }
            members.may_write(&device).then(|| {
                vec![Record::Deny {
                    device,
                    upto: m.applied(&device),
                }]
            })
        }
    }
}

/// The daemon's `allow = [...]` for a folder it is about to serve: every listed device not yet
/// allowed is recorded (one block, flushed) before the node starts. A folder this device may
/// not write to is left as it is (a clone cannot allow anyone).
pub fn allow_listed(drive: &mut Drive, devices: &[String]) -> Result<(), DriveError> {
    if !drive.writer {
        return Ok(());
    }
    let m = merge_of(&mut drive.meta);
    let mut block = vec![Record::now()];
    for text in devices {
        let device = parse_device(text)?;
        if let Some(recs) = records_for(&m, Change::Allow { device }) {
            block.extend(recs);
        }
    }
    if block.len() > 1 {
        drive.meta.append(&record::encode(&block))?;
        drive.meta.sync()?;
    }
    Ok(())
}

/// Leaves a request for the running node and waits for its answer.
fn ask_running(root: &Path, change: Change, wait: Duration) -> Result<Outcome, DriveError> {
    let root_dir = dirs::open_folder(root)?;
    let state = dirs::open_state(&*root_dir, root, false)?;
    match state.create_dir(REQUESTS_DIR, 0o700) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e.into()),
    }
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| io::Error::other(e.to_string()))?;
    let name = hex(&nonce);
    let req = format!("{REQUESTS_DIR}/{name}.req");
    let answer = format!("{REQUESTS_DIR}/{name}.done");
    let body = serde_json::to_vec(&change).map_err(io::Error::other)?;
    state.write_atomic(&req, &body, 0o600)?;
    let deadline = Instant::now() + wait;
    loop {
        if let Some(bytes) = read_small(&*state, &answer)? {
            let _ = state.remove_file(&answer);
            return serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::other(format!("the running node's answer: {e}")).into());
        }
        if Instant::now() >= deadline {
            // Taken back if still there: a node that starts later must not act on a request
            // whose asker already said it failed.
            let _ = state.remove_file(&req);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the node serving {} did not answer within {} s (is it a clone, or stuck?)",
                    root.display(),
                    wait.as_secs()
                ),
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_small(dir: &dyn Dir, rel: &str) -> Result<Option<Vec<u8>>, DriveError> {
    let f = match dir.open(rel, crate::fsio::OpenHow::READ) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let len = f.metadata()?.len.min(MAX_REQUEST_BYTES);
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, 0)?;
    Ok(Some(buf))
}

/// The requests waiting in the state directory (their names without `.req`), at most
/// [`MAX_REQUESTS_PER_POLL`]: one directory listing, cheap when there are none.
pub(crate) fn waiting_requests(state: &dyn Dir) -> Vec<String> {
    let Ok(entries) = state.read_dir(REQUESTS_DIR) else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|(name, _)| name.strip_suffix(".req").map(str::to_owned))
        .take(MAX_REQUESTS_PER_POLL)
        .collect()
}

/// For the running writer: answers the requests `stems` ([`waiting_requests`]), appending
/// what they record through `append` (the writer's commit path: flushed before any peer hears
/// of it). `merge` is the membership as this node knows it.
pub(crate) fn take_requests(
    state: &dyn Dir,
    stems: &[String],
    merge: &Merge,
    mut append: impl FnMut(Vec<Record>) -> Result<u64, String>,
) {
    for stem in stems {
        let req = format!("{REQUESTS_DIR}/{stem}.req");
        let parsed: Result<Change, String> = match read_small(state, &req) {
            Ok(Some(b)) => serde_json::from_slice(&b).map_err(|e| format!("bad request: {e}")),
            Ok(None) => continue,
            Err(e) => Err(e.to_string()),
        };
        let _ = state.remove_file(&req);
        let outcome = match parsed {
            Err(why) => Outcome::Refused { why },
            Ok(change) => match refusal(merge, change) {
                Some(r) => r,
                None => match records_for(merge, change) {
                    None => Outcome::Unchanged,
                    Some(recs) => match append(recs) {
                        Ok(version) => Outcome::Recorded { version },
                        Err(why) => Outcome::Refused { why },
                    },
                },
            },
        };
        let body = serde_json::to_vec(&outcome).unwrap_or_default();
        let _ = state.write_atomic(&format!("{REQUESTS_DIR}/{stem}.done"), &body, 0o600);
    }
}

/// The merge of one feed's held blocks (the writer's own metadata feed, for requests).
pub(crate) fn merge_of(meta: &mut Feed<DiskStorage>) -> Merge {
    merge_feeds(std::slice::from_mut(meta))
}

fn canonical(root: &Path) -> Result<std::path::PathBuf, DriveError> {
    std::fs::canonicalize(root).map_err(|error| DriveError::Missing {
        path: root.to_path_buf(),
        error,
    })
}

/// Device ids as hex in JSON.
mod hex_key {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::util::hex(k))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        super::parse_device(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_with_hex_ids() {
        let device = SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes();
        let c = Change::Allow { device };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            text,
            format!("{{\"cmd\":\"allow\",\"device\":\"{}\"}}", hex(&device))
        );
        assert_eq!(serde_json::from_str::<Change>(&text).unwrap(), c);
        assert!(serde_json::from_str::<Change>(r#"{"cmd":"allow","device":"zz"}"#).is_err());
    }
}
