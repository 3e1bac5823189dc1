//! The workspace's layering (issue 9): the controller library does not link the agent, and the
//! agent does not link the controller. `proto` and `io` link neither. Only `ringcast` (cli/,
//! the binary and the demo) and this test crate may link both.
//!
//! Read from `cargo metadata --no-deps`: the dependencies each workspace package declares
//! (optional ones included, so a feature cannot sneak an edge in). Only workspace packages can
//! depend on workspace packages, so following those edges finds every path there is. Dev
//! dependencies are not links of the library and are left out.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::process::Command;

/// Package name → the workspace packages it depends on for its build (normal and build
/// dependencies).
type Graph = BTreeMap<String, BTreeSet<String>>;

fn workspace_graph() -> Graph {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(ringcast_tests::workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("running {cargo:?} metadata: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("cargo metadata printed something that is not JSON: {e}"));
    let packages = meta["packages"]
        .as_array()
        .unwrap_or_else(|| panic!("cargo metadata has no package list"));
    let members: BTreeSet<String> = packages
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    let mut graph = Graph::new();
    for p in packages {
        let name = p["name"].as_str().unwrap_or_default().to_owned();
        let deps = p["dependencies"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            // `kind` is null for normal dependencies, "build" or "dev" otherwise.
            .filter(|d| d["kind"].as_str() != Some("dev"))
            .filter_map(|d| d["name"].as_str())
            .filter(|d| members.contains(*d))
            .map(str::to_owned)
            .collect();
        graph.insert(name, deps);
    }
    for crate_name in [
        "ringcast-proto",
        "ringcast-io",
        "ringcast-agent",
        "ringcast-controller",
    ] {
        assert!(
            graph.contains_key(crate_name),
            "{crate_name} is not a workspace member any more; update this test"
        );
    }
    graph
}

/// The dependency path from `from` to `to`, if there is one.
fn path(graph: &Graph, from: &str, to: &str) -> Option<Vec<String>> {
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([from]);
    while let Some(at) = queue.pop_front() {
        if at == to {
            let mut path = vec![to.to_owned()];
            let mut cur = to;
            while let Some(prev) = came_from.get(cur) {
                path.push((*prev).to_owned());
                cur = prev;
            }
            path.reverse();
            return Some(path);
        }
        for next in graph.get(at).into_iter().flatten() {
            if next != from && !came_from.contains_key(next.as_str()) {
                came_from.insert(next, at);
                queue.push_back(next);
            }
        }
    }
    None
}

fn assert_no_link(graph: &Graph, from: &str, to: &str, why: &str) {
    if let Some(p) = path(graph, from, to) {
        panic!(
            "LAYERING BROKEN: {from} links {to} ({}). {why}",
            p.join(" -> ")
        );
    }
}

#[test]
fn the_controller_library_does_not_link_the_agent() {
    let g = workspace_graph();
    assert_no_link(
        &g,
        "ringcast-controller",
        "ringcast-agent",
        "Code both need belongs in ringcast-io (I/O) or ringcast-proto (rules); code that \
         needs both (the demo, the fleet of agents) belongs in the `ringcast` crate (cli/).",
    );
}

#[test]
fn the_agent_does_not_link_the_controller() {
    let g = workspace_graph();
    assert_no_link(
        &g,
        "ringcast-agent",
        "ringcast-controller",
        "The device daemon must stay small and must not carry the controller; share through \
         ringcast-io or ringcast-proto.",
    );
}

#[test]
fn proto_and_io_link_neither_daemon() {
    let g = workspace_graph();
    for lower in ["ringcast-proto", "ringcast-io"] {
        for daemon in ["ringcast-agent", "ringcast-controller"] {
            assert_no_link(
                &g,
                lower,
                daemon,
                "proto and io sit below both daemons (DESIGN.md \"Workspace\").",
            );
        }
    }
}

#[test]
fn only_the_command_line_and_the_tests_link_both_daemons() {
    let g = workspace_graph();
    let both: Vec<&str> = g
        .keys()
        .map(String::as_str)
        .filter(|p| {
            path(&g, p, "ringcast-agent").is_some() && path(&g, p, "ringcast-controller").is_some()
        })
        .collect();
    assert_eq!(
        both,
        ["ringcast", "ringcast-tests"],
        "LAYERING BROKEN: only `ringcast` (cli/) and `ringcast-tests` may link both the agent \
         and the controller"
    );
}

#[test]
fn a_link_is_found_through_an_intermediate_crate() {
    // The check itself: an indirect edge counts, and the message names the path.
    let g: Graph = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec![]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        path(&g, "a", "c"),
        Some(vec!["a".into(), "b".into(), "c".into()])
    );
    assert_eq!(path(&g, "c", "a"), None);
    assert_eq!(path(&g, "d", "c").map(|p| p.len()), Some(4));
    let err = std::panic::catch_unwind(|| assert_no_link(&g, "a", "c", "fix it"))
        .expect_err("a link through b is a link");
    let text = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(text.contains("a -> b -> c"), "{text}");
}
