//! What the online verbs share: server address, token, the runtime, table printing.

use ringcast_controller::client::Client;

/// Server and token flags of every online verb.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// Controller URL.
    #[arg(
        long,
        env = "RINGCAST_SERVER",
        default_value = "http://127.0.0.1:8480",
        global = true
    )]
    pub server: String,
    /// API bearer token.
    #[arg(long, env = "RINGCAST_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

impl Conn {
    /// A client.
    pub fn client(&self) -> Client {
        Client::new(&self.server, self.token.clone())
    }
}

/// Run a future on a fresh runtime.
pub fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(f))
}

/// Print a left-aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w.get(i).copied().unwrap_or(0)))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// A text progress bar, `[#####-----]`.
pub fn bar(done: u32, total: u32, width: usize) -> String {
    let total = total.max(1);
    let filled = ((done.min(total) as usize) * width) / total as usize;
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Print JSON.
pub fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
