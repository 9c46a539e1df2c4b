//! The agent's logs: tracing to stderr, text or JSON lines, with a filter that can be changed
//! while the agent runs (`PUT /debug/log-level` on the metrics address).

use std::sync::Arc;

use tracing_subscriber::{
    EnvFilter, Layer as _, Registry, layer::SubscriberExt as _, reload,
    util::SubscriberInitExt as _,
};

/// The live log filter.
#[derive(Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Arc<std::sync::Mutex<String>>,
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LogLevel").field(&self.get()).finish()
    }
}

impl LogLevel {
    /// The filter in force, as it was given.
    pub fn get(&self) -> String {
        self.current
            .lock()
            .map(|current| current.clone())
            .unwrap_or_default()
    }

    /// Replaces the filter; a directive that does not parse changes nothing.
    pub fn set(&self, directives: &str) -> anyhow::Result<()> {
        let directives = directives.trim();
        let filter = EnvFilter::try_new(directives)
            .map_err(|error| anyhow::anyhow!("{directives:?} is not a log filter: {error}"))?;
        self.handle.reload(filter)?;
        if let Ok(mut current) = self.current.lock() {
            *current = directives.to_owned();
        }
        tracing::info!(filter = directives, "log level changed");
        Ok(())
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `directives`.
pub fn init(json: bool, directives: &str) -> anyhow::Result<LogLevel> {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| directives.to_owned());
    let filter = EnvFilter::try_new(&directives)
        .map_err(|error| anyhow::anyhow!("{directives:?} is not a log filter: {error}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let output = if json {
        output.json().boxed()
    } else {
        output.boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()?;
    Ok(LogLevel {
        handle,
        current: Arc::new(std::sync::Mutex::new(directives)),
    })
}
