//! Beyond the LAN: finding peers over the BitTorrent mainline DHT ([`dht`]), asking the home
//! router for a port ([`portmap`]), and meeting through a blind relay ([`relay`]) when no direct
//! path works.
//!
//! Every name a stranger can see is derived from a feed's *discovery key* (itself a one-way hash
//! of the public key), each with a context of its own (SPEC §9): the DHT info-hash and the relay
//! token cannot be turned back into the discovery key, nor into each other, nor into the key
//! that reads the feed. Whoever knows the feed's public key can compute both; nobody else can.
//!
//! All of this is off unless asked for (`--dht`, `--relay`): announcing reveals to the DHT that
//! some address serves *something* under a hash, which a user on a LAN need not reveal.

pub mod dht;
pub mod portmap;
pub mod relay;

/// The mainline info-hash a feed is announced and looked up under (SPEC §9.1): the first 20
/// bytes of a BLAKE3 key derivation from the discovery key.
pub fn info_hash(discovery_key: &[u8; 32]) -> [u8; 20] {
    let k = blake3::derive_key("feedsync 2026-12 dht info-hash", discovery_key);
    k[..20].try_into().expect("20 of 32 bytes")
}

/// The token two peers of a feed meet under at a relay (SPEC §9.3).
pub fn relay_token(discovery_key: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key("feedsync 2026-12 relay token", discovery_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_differ_from_each_other_and_from_the_discovery_key() {
        let dk = crate::core::crypto::discovery_key(&[7u8; 32]);
        let (h, t) = (info_hash(&dk), relay_token(&dk));
        assert_ne!(&h[..], &dk[..20]);
        assert_ne!(&t[..], &dk[..]);
        assert_ne!(&h[..], &t[..20]);
        // Stable: peers on other versions must meet under the same names (SPEC vectors).
        assert_eq!(info_hash(&dk), h);
        let other = crate::core::crypto::discovery_key(&[8u8; 32]);
        assert_ne!(info_hash(&other), h);
    }
}
