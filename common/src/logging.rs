//! Log set-up shared by the binaries: human-readable lines on stderr, filtered by `RUST_LOG`
//! (default `info`). Key material is never logged anywhere in the code base.

/// Initialises the global tracing subscriber. Colours only when stderr is a terminal: log files
/// and the journal get plain text.
pub fn init() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,h2=warn,tower=warn,hyper=warn,sled=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
