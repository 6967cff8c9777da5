//! The terminal: a live table of functions redrawn in place when stdout is a
//! terminal, with log lines (ebb's own and the replicas') scrolling above it;
//! plain log lines otherwise.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, OnceLock};

/// Where `ebb dev` writes.
pub struct Console {
    /// stdout is a terminal: show the live table.
    live: bool,
    /// stderr is that terminal too: logs must go above the table.
    share: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Lines of the table on screen now.
    drawn: usize,
    table: String,
}

impl Console {
    /// Looks at stdout and stderr.
    pub fn detect() -> Self {
        let live = std::io::stdout().is_terminal();
        Self {
            live,
            share: live && std::io::stderr().is_terminal(),
            state: Mutex::new(State::default()),
        }
    }

    /// Plain lines, never a table (tests, pipes).
    pub fn plain() -> Self {
        Self {
            live: false,
            share: false,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether the live table is shown.
    pub fn live(&self) -> bool {
        self.live
    }

    /// One log line.
    pub fn line(&self, line: &str) {
        let mut b = Vec::with_capacity(line.len() + 1);
        b.extend_from_slice(line.as_bytes());
        b.push(b'\n');
        self.log(&b);
    }

    /// Log output (whole lines), above the table when one is shown.
    pub fn log(&self, bytes: &[u8]) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !self.share || st.drawn == 0 {
            let _ = std::io::stderr().write_all(bytes);
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\x1b[{}A\r\x1b[J", st.drawn);
        let _ = out.flush();
        let _ = std::io::stderr().write_all(bytes);
        let _ = out.write_all(st.table.as_bytes());
        let _ = out.flush();
        st.drawn = st.table.lines().count();
    }

    /// Replaces the table on screen.
    pub fn draw(&self, table: &str) {
        if !self.live {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.drawn > 0 && st.table == table {
            return; // unchanged: no flicker
        }
        let mut out = std::io::stdout().lock();
        if st.drawn > 0 {
            let _ = write!(out, "\x1b[{}A\r\x1b[J", st.drawn);
        }
        let _ = out.write_all(table.as_bytes());
        let _ = out.flush();
        st.table = table.to_string();
        st.drawn = table.lines().count();
    }
}

/// The console of this process, shared by logging and `ebb dev`.
pub fn global() -> Arc<Console> {
    static CONSOLE: OnceLock<Arc<Console>> = OnceLock::new();
    CONSOLE.get_or_init(|| Arc::new(Console::detect())).clone()
}

/// A `tracing` writer into the console.
#[derive(Clone)]
pub struct LogWriter(pub Arc<Console>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.log(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
