//! MQTT topic names (DESIGN.md "MQTT topics"): build and parse.

use crate::error::{Rejection, Result};
use crate::limits::check_name;

/// Topic builder and parser for one fleet's prefix (default `ringcast/{fleet}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

/// What a topic under the prefix addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// `…/trust`
    Trust,
    /// `…/rings/{ring}/directive`
    RingDirective(String),
    /// `…/devices/{device}/directive`
    DeviceDirective(String),
    /// `…/rings/{ring}/products/{product}/directive`: a ring's directive for one product.
    RingProductDirective {
        /// Ring.
        ring: String,
        /// Product (a release name).
        product: String,
    },
    /// `…/devices/{device}/products/{product}/directive`: one device's directive for one
    /// product (a pin).
    DeviceProductDirective {
        /// Device.
        device: String,
        /// Product (a release name).
        product: String,
    },
    /// `…/devices/{device}/state`
    State(String),
    /// `…/devices/{device}/events`
    Events(String),
    /// `…/devices/{device}/online`
    Online(String),
}

impl Topics {
    /// The default prefix `ringcast/{fleet}`.
    pub fn for_fleet(fleet: &str) -> Result<Topics> {
        check_name("fleet", fleet)?;
        Ok(Topics {
            prefix: format!("ringcast/{fleet}"),
        })
    }

    /// A custom prefix: segments separated by `/`, no wildcards, no empty segment.
    pub fn with_prefix(prefix: &str) -> Result<Topics> {
        let p = prefix.trim_end_matches('/');
        if p.is_empty()
            || p.split('/')
                .any(|seg| seg.is_empty() || seg.contains(['+', '#']))
            || p.len() > 256
        {
            return Err(Rejection::malformed(format!(
                "topic prefix {prefix:?} must be non-empty segments without '+' or '#'"
            )));
        }
        Ok(Topics {
            prefix: p.to_owned(),
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `…/trust`
    pub fn trust(&self) -> String {
        format!("{}/trust", self.prefix)
    }

    /// `…/rings/{ring}/directive`
    pub fn ring_directive(&self, ring: &str) -> String {
        format!("{}/rings/{ring}/directive", self.prefix)
    }

    /// `…/devices/{device}/directive`
    pub fn device_directive(&self, device: &str) -> String {
        format!("{}/devices/{device}/directive", self.prefix)
    }

    /// `…/rings/{ring}/products/{product}/directive`
    pub fn ring_product_directive(&self, ring: &str, product: &str) -> String {
        format!("{}/rings/{ring}/products/{product}/directive", self.prefix)
    }

    /// `…/devices/{device}/products/{product}/directive`
    pub fn device_product_directive(&self, device: &str, product: &str) -> String {
        format!(
            "{}/devices/{device}/products/{product}/directive",
            self.prefix
        )
    }

    /// The directive topic of a ring (`device` `None`) or of one device, for one product or
    /// (`product` `None`) the single-product topic.
    pub fn directive(&self, ring: &str, device: Option<&str>, product: Option<&str>) -> String {
        match (device, product) {
            (None, None) => self.ring_directive(ring),
            (Some(d), None) => self.device_directive(d),
            (None, Some(p)) => self.ring_product_directive(ring, p),
            (Some(d), Some(p)) => self.device_product_directive(d, p),
        }
    }

    /// `…/devices/{device}/state`
    pub fn state(&self, device: &str) -> String {
        format!("{}/devices/{device}/state", self.prefix)
    }

    /// `…/devices/{device}/events`
    pub fn events(&self, device: &str) -> String {
        format!("{}/devices/{device}/events", self.prefix)
    }

    /// `…/devices/{device}/online`
    pub fn online(&self, device: &str) -> String {
        format!("{}/devices/{device}/online", self.prefix)
    }

    /// The controller's re-read fence, `…/devices/@reread/state`: matched by the state
    /// wildcard, so it arrives after every retained report the broker sent before it; `@`
    /// is in no valid device name, so no device can publish here under the shipped ACL, and
    /// [`Topics::parse`] refuses it.
    pub fn reread_fence(&self) -> String {
        format!("{}/devices/@reread/state", self.prefix)
    }

    /// Subscription filters for the controller: every device's state, events and online flag.
    pub fn controller_filters(&self) -> [String; 3] {
        [
            format!("{}/devices/+/state", self.prefix),
            format!("{}/devices/+/events", self.prefix),
            format!("{}/devices/+/online", self.prefix),
        ]
    }

    /// The only topics an agent subscribes to: trust, its ring's directive, its own directive.
    pub fn agent_subscriptions(&self, ring: &str, device: &str) -> [String; 3] {
        [
            self.trust(),
            self.ring_directive(ring),
            self.device_directive(device),
        ]
    }

    /// The directive topics an agent running `product` subscribes to besides the trust topic:
    /// the ring's and its own, for that product.
    pub fn product_subscriptions(&self, ring: &str, device: &str, product: &str) -> [String; 2] {
        [
            self.ring_product_directive(ring, product),
            self.device_product_directive(device, product),
        ]
    }

    /// Parse a topic under this prefix. Names are validated, so a device id taken from a topic
    /// is always a safe name.
    pub fn parse(&self, topic: &str) -> Result<Topic> {
        let rest = topic
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| {
                Rejection::malformed(format!("topic {topic:?} is not under {}", self.prefix))
            })?;
        let parts: Vec<&str> = rest.split('/').collect();
        let t = match parts.as_slice() {
            ["trust"] => Topic::Trust,
            ["rings", ring, "directive"] => {
                check_name("ring", ring)?;
                Topic::RingDirective((*ring).to_owned())
            }
            ["rings", ring, "products", product, "directive"] => {
                check_name("ring", ring)?;
                check_name("product", product)?;
                Topic::RingProductDirective {
                    ring: (*ring).to_owned(),
                    product: (*product).to_owned(),
                }
            }
            ["devices", dev, "products", product, "directive"] => {
                check_name("device", dev)?;
                check_name("product", product)?;
                Topic::DeviceProductDirective {
                    device: (*dev).to_owned(),
                    product: (*product).to_owned(),
                }
            }
            ["devices", dev, leaf] => {
                check_name("device", dev)?;
                let d = (*dev).to_owned();
                match *leaf {
                    "directive" => Topic::DeviceDirective(d),
                    "state" => Topic::State(d),
                    "events" => Topic::Events(d),
                    "online" => Topic::Online(d),
                    _ => return Err(Rejection::malformed(format!("unknown topic {topic:?}"))),
                }
            }
            _ => return Err(Rejection::malformed(format!("unknown topic {topic:?}"))),
        };
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse_round_trip() {
        let t = Topics::for_fleet("plant-7").unwrap();
        assert_eq!(t.trust(), "ringcast/plant-7/trust");
        assert_eq!(
            t.ring_directive("canary"),
            "ringcast/plant-7/rings/canary/directive"
        );
        assert_eq!(t.state("dev-1"), "ringcast/plant-7/devices/dev-1/state");
        assert_eq!(t.parse(&t.trust()).unwrap(), Topic::Trust);
        assert_eq!(
            t.parse(&t.ring_directive("canary")).unwrap(),
            Topic::RingDirective("canary".into())
        );
        assert_eq!(
            t.parse(&t.device_directive("d")).unwrap(),
            Topic::DeviceDirective("d".into())
        );
        assert_eq!(
            t.parse(&t.ring_product_directive("canary", "os")).unwrap(),
            Topic::RingProductDirective {
                ring: "canary".into(),
                product: "os".into()
            }
        );
        assert_eq!(
            t.device_product_directive("d", "os"),
            "ringcast/plant-7/devices/d/products/os/directive"
        );
        assert_eq!(
            t.parse(&t.directive("x", Some("d"), Some("app"))).unwrap(),
            Topic::DeviceProductDirective {
                device: "d".into(),
                product: "app".into()
            }
        );
        assert_eq!(
            t.directive("canary", None, None),
            t.ring_directive("canary")
        );
        assert_eq!(
            t.directive("canary", Some("d"), None),
            t.device_directive("d")
        );
        assert_eq!(t.parse(&t.state("d")).unwrap(), Topic::State("d".into()));
        assert_eq!(t.parse(&t.events("d")).unwrap(), Topic::Events("d".into()));
        assert_eq!(t.parse(&t.online("d")).unwrap(), Topic::Online("d".into()));
        assert!(
            t.parse(&t.reread_fence()).is_err(),
            "the fence must never pass for a device's topic"
        );
    }

    #[test]
    fn parse_rejects_foreign_and_odd_topics() {
        let t = Topics::for_fleet("f").unwrap();
        for bad in [
            "ringcast/g/trust",
            "ringcast/f",
            "ringcast/f/devices/d/x",
            "ringcast/f/devices/+/state",
            "ringcast/f/rings/a/b/directive",
            "ringcast/f/rings/a/products/+/directive",
            "ringcast/f/rings/a/products//directive",
            "ringcast/f/devices/d/products/os/state",
            "ringcast/f/devices//state",
            "ringcast/ftrust",
        ] {
            assert!(t.parse(bad).is_err(), "{bad} parsed");
        }
        assert!(Topics::for_fleet("a/b").is_err());
        assert!(Topics::with_prefix("a/+/b").is_err());
        assert_eq!(
            Topics::with_prefix("corp/ringcast/").unwrap().trust(),
            "corp/ringcast/trust"
        );
    }
}
