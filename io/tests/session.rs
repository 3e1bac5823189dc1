//! The session type against a real broker (rumqttd, one MQTT 5 and one MQTT 3.1.1 listener):
//! the same events for both protocol versions, retained delivery on subscribe, persistent
//! sessions, and the hint a 3.1.1-only broker earns.

use ringcast_io::mqtt::{self, Event, Options, Protocol, QoS};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn free_port() -> u16 {
    ringcast_io::ports::reserve().unwrap()
}

/// A rumqttd with a 3.1.1 listener and an MQTT 5 listener; returns (v4 port, v5 port).
fn broker() -> (u16, u16) {
    let (p4, p5) = (free_port(), free_port());
    let server = |name: &str, port: u16| rumqttd::ServerSettings {
        name: name.into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 10_000,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_owned(), server("v4", p4))])),
        v5: Some(HashMap::from([("v5".to_owned(), server("v5", p5))])),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let _ = rumqttd::Broker::new(config).start();
    });
    for port in [p4, p5] {
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "broker not up on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (p4, p5)
}

async fn next(el: &mut mqtt::EventLoop, what: &str, want: impl Fn(&Event) -> bool) -> Event {
    let res = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(e) if want(&e) => return e,
                Ok(_) => {}
                Err(e) => panic!("{what}: connection error {e}"),
            }
        }
    })
    .await;
    res.unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

fn options(id: &str, port: u16, protocol: Protocol) -> Options {
    let mut o = Options::new(id, "127.0.0.1", port);
    o.protocol = protocol;
    o.connect_timeout = Duration::from_secs(2);
    o
}

#[tokio::test]
async fn both_protocols_deliver_retained_messages_with_the_same_events() {
    let (p4, p5) = broker();
    for (protocol, port) in [(Protocol::V311, p4), (Protocol::V5, p5)] {
        let (pubc, mut publ) = mqtt::session(&options(&format!("pub-{protocol}"), port, protocol));
        next(&mut publ, "publisher connack", |e| {
            matches!(e, Event::Connected { .. })
        })
        .await;
        pubc.try_publish("t/a/state", QoS::AtLeastOnce, true, b"one".to_vec())
            .unwrap();
        next(&mut publ, "puback", |e| matches!(e, Event::PubAck { .. })).await;

        let (sub, mut subl) = mqtt::session(&options(&format!("sub-{protocol}"), port, protocol));
        next(&mut subl, "subscriber connack", |e| {
            matches!(e, Event::Connected { .. })
        })
        .await;
        assert_eq!(subl.protocol(), protocol);
        sub.try_subscribe_many(&[
            ("t/+/state".into(), QoS::AtMostOnce),
            ("t/+/events".into(), QoS::AtLeastOnce),
        ])
        .unwrap();
        let ack = next(&mut subl, "suback", |e| matches!(e, Event::SubAck { .. })).await;
        assert!(
            matches!(&ack, Event::SubAck { granted, .. } if granted == &vec![true, true]),
            "{protocol}: {ack:?}"
        );
        let got = next(&mut subl, "retained", |e| matches!(e, Event::Message(_))).await;
        match got {
            Event::Message(m) => {
                assert_eq!(m.topic, "t/a/state");
                assert_eq!(&m.payload[..], b"one");
                assert!(
                    m.retain,
                    "{protocol}: delivered on subscribe means retained"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn persistent_session_receives_what_was_published_while_it_was_away() {
    let (p4, p5) = broker();
    for (protocol, port) in [(Protocol::V311, p4), (Protocol::V5, p5)] {
        let mut o = options(&format!("keeper-{protocol}"), port, protocol);
        o.persistent = true;
        {
            let (c, mut l) = mqtt::session(&o);
            next(&mut l, "connack", |e| matches!(e, Event::Connected { .. })).await;
            c.try_subscribe_many(&[("q/events".into(), QoS::AtLeastOnce)])
                .unwrap();
            next(&mut l, "suback", |e| matches!(e, Event::SubAck { .. })).await;
            c.try_disconnect().unwrap();
            next(&mut l, "disconnect", |e| matches!(e, Event::DisconnectSent)).await;
        }
        let (pubc, mut publ) = mqtt::session(&options(&format!("p2-{protocol}"), port, protocol));
        next(&mut publ, "connack", |e| {
            matches!(e, Event::Connected { .. })
        })
        .await;
        pubc.try_publish("q/events", QoS::AtLeastOnce, false, b"while away".to_vec())
            .unwrap();
        next(&mut publ, "puback", |e| matches!(e, Event::PubAck { .. })).await;

        let (_c, mut l) = mqtt::session(&o);
        let ack = next(&mut l, "connack", |e| matches!(e, Event::Connected { .. })).await;
        assert_eq!(
            ack,
            Event::Connected {
                session_present: true
            },
            "{protocol}"
        );
        let got = next(&mut l, "queued message", |e| matches!(e, Event::Message(_))).await;
        assert!(
            matches!(&got, Event::Message(m) if &m.payload[..] == b"while away"),
            "{protocol}: {got:?}"
        );
    }
}

#[tokio::test]
async fn mqtt5_against_a_311_only_listener_says_how_to_fix_it() {
    let (p4, _) = broker();
    let (_c, mut l) = mqtt::session(&options("v5-on-v4", p4, Protocol::V5));
    let err = tokio::time::timeout(WAIT, async {
        loop {
            if let Err(e) = l.poll().await {
                return e;
            }
        }
    })
    .await
    .expect("a 3.1.1 listener must refuse an MQTT 5 CONNECT");
    assert!(
        err.to_string().contains("protocol = \"3.1.1\""),
        "no hint in: {err}"
    );
}

#[tokio::test]
async fn auto_settles_on_whichever_version_the_broker_speaks() {
    let (p4, p5) = broker();
    for (port, want) in [(p5, Protocol::V5), (p4, Protocol::V311)] {
        let (c, mut l) = mqtt::session(&options(&format!("auto-{want}"), port, Protocol::Auto));
        let mut refusals = 0;
        let connected = tokio::time::timeout(WAIT, async {
            loop {
                match l.poll().await {
                    Ok(Event::Connected { .. }) => return,
                    Ok(_) => {}
                    Err(_) => refusals += 1,
                }
            }
        })
        .await;
        assert!(
            connected.is_ok(),
            "auto never connected to the {want} listener"
        );
        assert_eq!(l.protocol(), want);
        assert_eq!(refusals, usize::from(want == Protocol::V311), "{want}");
        // The handle follows the switch: a request made now goes out on the settled version.
        c.try_subscribe_many(&[("x/#".into(), QoS::AtMostOnce)])
            .unwrap();
        next(&mut l, "suback after auto", |e| {
            matches!(e, Event::SubAck { .. })
        })
        .await;
    }
}

#[test]
fn protocol_names_parse_and_print() {
    assert_eq!("auto".parse::<Protocol>().unwrap(), Protocol::Auto);
    assert_eq!(Protocol::default(), Protocol::Auto);
    assert_eq!("5".parse::<Protocol>().unwrap(), Protocol::V5);
    assert_eq!("3.1.1".parse::<Protocol>().unwrap(), Protocol::V311);
    assert!("3".parse::<Protocol>().is_err());
    assert_eq!(Protocol::V311.to_string(), "3.1.1");
    #[derive(serde::Deserialize)]
    struct C {
        protocol: Protocol,
    }
    let c: C = serde_json::from_str(r#"{"protocol":"3.1.1"}"#).unwrap();
    assert_eq!(c.protocol, Protocol::V311);
}
