//! `ringcast-load`: the controller under a synthetic fleet, without agents. The test publishes
//! every device's retained state report (and online flag) itself, so fleets of 100,000 fit on
//! one machine.
//!
//! `fleet-view` measures, on the embedded broker or on the shipped Mosquitto limits (plain
//! listener), in one run:
//! 1. the first read of N retained reports by a starting controller;
//! 2. the re-read after a controller restart, with newer reports published while it was down;
//! 3. a live burst of N reports from four connections at once, ingested by the controller,
//!    side by side with a plain MQTT subscriber on the same wildcard (the broker's own
//!    delivery of the same messages): the ratio is the controller's cost over the broker's.
//!
//! ```text
//! cargo run --release -p ringcast-tests --bin ringcast-load -- fleet-view --devices 100000 --broker mosquitto
//! ```

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use ringcast_proto::Topics;
use ringcast_tests::mqtt::{client_with_nodelay, plain_options};
use ringcast_tests::sim_stage::{ring, BrokerKind, Stage, StageSpec, FLEET};
use ringcast_tests::synthetic::{self, at_seq};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "ringcast-load",
    version,
    about = "The controller under a synthetic fleet"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Re-read and live-ingest N devices' retained reports; print the timings.
    FleetView {
        /// Devices.
        #[arg(long, default_value_t = 20_000)]
        devices: usize,
        /// Broker: the embedded rumqttd, or Mosquitto with the shipped limits.
        #[arg(long, value_enum, default_value_t = Broker::Embedded)]
        broker: Broker,
        /// Longest wait for any one phase.
        #[arg(long, default_value = "300")]
        timeout_secs: u64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Broker {
    Embedded,
    Mosquitto,
}

async fn until(stage: &Stage, seq: u64, n: usize, timeout: Duration) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    while at_seq(stage, seq) < n {
        if t0.elapsed() > timeout {
            bail!(
                "only {} of {n} devices at report seq {seq} after {timeout:?}",
                at_seq(stage, seq)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(t0.elapsed())
}

/// Publish from four connections at once; returns when the broker acked everything.
async fn burst(port: u16, msgs: Vec<(String, Vec<u8>)>) -> anyhow::Result<()> {
    synthetic::burst(port, msgs, 4, Duration::from_secs(600)).await?;
    Ok(())
}

/// A plain subscriber on the state wildcard that reports when it has seen `n` messages.
async fn floor_subscriber(
    port: u16,
    n: usize,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<Instant>> {
    let topics = Topics::for_fleet(FLEET).expect("fleet name");
    let mut o = plain_options("floor", "127.0.0.1", port);
    o.set_max_packet_size(1024 * 1024, 1024 * 1024);
    let (client, mut el) = client_with_nodelay(o, 64);
    client
        .subscribe(
            format!("{}/devices/+/state", topics.prefix()),
            rumqttc::QoS::AtMostOnce,
        )
        .await
        .context("floor subscribe")?;
    // Wait for the SUBACK (and drain any retained burst) before the live burst starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout(Duration::from_secs(2), el.poll()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("floor subscriber: {e}"),
            Err(_) => break,
        }
        if Instant::now() > deadline {
            bail!("floor subscriber never went quiet");
        }
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _keep = client;
        let mut got = 0usize;
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) => {
                    got += 1;
                    if got == n {
                        let _ = tx.send(Instant::now());
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    Ok(rx)
}

async fn fleet_view(n: usize, broker: Broker, timeout: Duration) -> anyhow::Result<()> {
    let kind = match broker {
        Broker::Embedded => BrokerKind::Embedded,
        Broker::Mosquitto => BrokerKind::MosquittoPlain,
    };
    let spec = StageSpec::new(kind, vec![ring("broad", &[100.0], "1h", 1, 0.2)], &[0]);
    let Some(mut stage) = Stage::start(spec).await else {
        bail!("mosquitto not found (apt-get install mosquitto)");
    };
    let port = synthetic::port_of(stage.broker_url())?;
    println!(
        "ringcast-load fleet-view: {n} devices, broker {broker:?} ({}), load average {}",
        stage.broker_url(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    let t = Instant::now();
    burst(port, synthetic::reports(n, 1, true)).await?;
    until(&stage, 1, n, timeout).await?;
    println!(
        "  seed, read live       {:>8.2} s  ({n} state + {n} online flags published and ingested)",
        t.elapsed().as_secs_f64()
    );

    stage.stop_controller().await;
    burst(port, synthetic::reports(n, 2, false)).await?;
    let t = Instant::now();
    stage.start_controller().await;
    until(&stage, 2, n, timeout).await?;
    let reread = t.elapsed();
    let c = stage.controller().shared().counters.clone();
    println!(
        "  re-read after restart {:>8.2} s  ({:.0} reports/s; paged {}, fence lost {})",
        reread.as_secs_f64(),
        n as f64 / reread.as_secs_f64(),
        c.reread_paged.load(std::sync::atomic::Ordering::Relaxed),
        c.reread_fence_lost
            .load(std::sync::atomic::Ordering::Relaxed)
    );

    let floor = floor_subscriber(port, n).await?;
    let t = Instant::now();
    burst(port, synthetic::reports(n, 3, false)).await?;
    let published = t.elapsed();
    until(&stage, 3, n, timeout).await?;
    let ctl = t.elapsed();
    let floor_at = tokio::time::timeout(timeout, floor)
        .await
        .context("the plain subscriber never saw the whole burst")?
        .context("floor subscriber")?;
    let floor = floor_at.duration_since(t);
    println!(
        "  live burst, publish   {:>8.2} s  (4 connections, QoS 1, acked by the broker)",
        published.as_secs_f64()
    );
    println!(
        "  live burst, plain sub {:>8.2} s  ({:.0} msgs/s: the broker's own delivery)",
        floor.as_secs_f64(),
        n as f64 / floor.as_secs_f64()
    );
    println!(
        "  live burst, controller{:>8.2} s  ({:.0} reports/s ingested)",
        ctl.as_secs_f64(),
        n as f64 / ctl.as_secs_f64()
    );
    println!(
        "  ratio controller / plain subscriber: {:.2}",
        ctl.as_secs_f64() / floor.as_secs_f64()
    );
    stage.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let res = match args.command {
        Command::FleetView {
            devices,
            broker,
            timeout_secs,
        } => fleet_view(devices, broker, Duration::from_secs(timeout_secs)).await,
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringcast-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}
