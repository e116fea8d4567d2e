//! Which Noise cipher suite to use: encrypt + decrypt throughput of snow's transport mode on
//! full-size Noise messages (65,535 bytes with tag), one core, for each suite snow offers.
//!
//! Run: `cargo bench --bench noise`.

use std::hint::black_box;
use std::time::Instant;

fn run(pattern: &str) -> (f64, f64) {
    let params: snow::params::NoiseParams = pattern.parse().unwrap();
    let a_key = snow::Builder::new(params.clone())
        .generate_keypair()
        .unwrap();
    let b_key = snow::Builder::new(params.clone())
        .generate_keypair()
        .unwrap();
    let mut a = snow::Builder::new(params.clone())
        .local_private_key(&a_key.private)
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut b = snow::Builder::new(params)
        .local_private_key(&b_key.private)
        .unwrap()
        .build_responder()
        .unwrap();
    let mut buf = vec![0u8; 65535];
    let mut out = vec![0u8; 65535];
    let n = a.write_message(&[], &mut buf).unwrap();
    b.read_message(&buf[..n], &mut out).unwrap();
    let n = b.write_message(&[], &mut buf).unwrap();
    a.read_message(&buf[..n], &mut out).unwrap();
    let n = a.write_message(&[], &mut buf).unwrap();
    b.read_message(&buf[..n], &mut out).unwrap();
    let mut a = a.into_transport_mode().unwrap();
    let mut b = b.into_transport_mode().unwrap();
    let plain = vec![7u8; 65535 - 16];
    let rounds = 16_000; // ~1 GiB
    // Buffers are allocated once: only the cipher is timed.
    let mut cts = vec![vec![0u8; 65535]; 64];
    let mut enc = 0.0;
    let mut dec = 0.0;
    for _ in 0..rounds / 64 {
        let t0 = Instant::now();
        for ct in cts.iter_mut() {
            let n = a.write_message(&plain, ct).unwrap();
            debug_assert_eq!(n, 65535);
        }
        enc += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for ct in &cts {
            black_box(b.read_message(ct, &mut out).unwrap());
        }
        dec += t1.elapsed().as_secs_f64();
    }
    let bytes = (rounds / 64 * 64) as f64 * plain.len() as f64;
    (bytes / enc / 1e6, bytes / dec / 1e6)
}

fn main() {
    println!("snow transport throughput, one core, 65,519-byte payloads");
    for p in [
        "Noise_XX_25519_ChaChaPoly_BLAKE2s",
        "Noise_XX_25519_AESGCM_BLAKE2s",
        "Noise_XX_25519_AESGCM_SHA256",
    ] {
        let (e, d) = run(p);
        println!("{p:<36} encrypt {e:>6.0} MB/s   decrypt {d:>6.0} MB/s");
    }
}
