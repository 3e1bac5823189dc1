//! Envelope verification (two signatures against a threshold-2 role) and streaming artifact
//! verification (256 MiB in memory, 64 KiB chunks). Results and the comparison with
//! `openssl dgst -sha256` and `sha256sum` are in BENCHMARKS.md.
//!
//! `cargo bench -p ringcast-proto --bench verify`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ringcast_proto::envelope::RELEASE_TYPE;
use ringcast_proto::testkit::{now, sample_release, Fixture};
use ringcast_proto::{verify_release, ArtifactVerifier, Envelope};
use std::hint::black_box;

fn envelope_verification(c: &mut Criterion) {
    let f = Fixture::with_release_threshold(2);
    let release = sample_release("app", 3, 1);
    let env = release.sign(&[&f.release, &f.release2]);
    let bytes = env.to_vec();
    let role = &f.trust.roles.release;

    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Elements(1));
    // Signatures only: two ed25519 verify_strict calls over the PAE bytes.
    g.bench_function("verify_2_of_2_signatures", |b| {
        b.iter(|| {
            black_box(&env)
                .verify(RELEASE_TYPE, &f.trust, role)
                .unwrap()
        })
    });
    // What a device does per release: parse the envelope bytes, verify, parse the manifest.
    g.bench_function("parse_verify_release_2_of_2", |b| {
        b.iter(|| {
            let env = Envelope::from_slice(black_box(&bytes)).unwrap();
            verify_release(&f.trust, &env, now(), jiff::SignedDuration::ZERO).unwrap()
        })
    });
    g.finish();
}

fn artifact_streaming(c: &mut Criterion) {
    const SIZE: usize = 256 << 20;
    const CHUNK: usize = 64 << 10;
    let data: Vec<u8> = (0..SIZE)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
        .collect();
    let sha = ringcast_proto::digest::sha256_hex(&data);

    let mut g = c.benchmark_group("artifact");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(10);
    g.bench_function("sha256_stream_256MiB_64KiB_chunks", |b| {
        b.iter_batched(
            || ArtifactVerifier::new(&sha, SIZE as u64).unwrap(),
            |mut v| {
                for chunk in data.chunks(CHUNK) {
                    v.update(chunk).unwrap();
                }
                v.finish().unwrap()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, envelope_verification, artifact_streaming);
criterion_main!(benches);
