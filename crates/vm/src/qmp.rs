//! A small synchronous QMP client (QEMU Machine Protocol: JSON lines over a unix socket).
//!
//! One connection per operation: QEMU's monitor serves one client at a time, and a short-lived
//! connection never accumulates unread events.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
#[expect(missing_docs, reason = "fields are named for what the #[error] message says")]
pub enum QmpError {
    /// Socket I/O failed.
    #[error("{op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// QEMU sent something that is not QMP.
    #[error("unexpected message from qemu: {line}")]
    Protocol { line: String },
    /// QEMU closed the connection.
    #[error("qemu closed the monitor connection")]
    Closed,
    /// QEMU answered with an error.
    #[error("{command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Message {
    Greeting,
    Return(Value),
    Error { class: String, desc: String },
    Event(String),
}

/// Pure: parses one line.
pub(crate) fn parse_message(line: &str) -> Result<Message, QmpError> {
    let bad = || QmpError::Protocol {
        line: line.chars().take(200).collect(),
    };
    let v: Value = serde_json::from_str(line).map_err(|_| bad())?;
    let obj = v.as_object().ok_or_else(bad)?;
    if obj.contains_key("QMP") {
        Ok(Message::Greeting)
    } else if let Some(r) = obj.get("return") {
        Ok(Message::Return(r.clone()))
    } else if let Some(e) = obj.get("error") {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        Ok(Message::Error {
            class: s("class"),
            desc: s("desc"),
        })
    } else if let Some(ev) = obj.get("event") {
        Ok(Message::Event(ev.as_str().unwrap_or("").to_owned()))
    } else {
        Err(bad())
    }
}

/// Pure: the line for a command.
pub(crate) fn command_line(command: &str, args: Option<Value>) -> String {
    let mut v = json!({ "execute": command });
    if let Some(a) = args {
        v["arguments"] = a;
    }
    let mut s = v.to_string();
    s.push('\n');
    s
}

/// A negotiated QMP connection.
#[derive(Debug)]
pub(crate) struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects, reads the greeting, leaves negotiation mode.
    pub(crate) fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let io = |op| move |source| QmpError::Io { op, source };
        let stream = UnixStream::connect(path).map_err(io("connect"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io("set timeout"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io("set timeout"))?;
        let reader = BufReader::new(stream.try_clone().map_err(io("clone socket"))?);
        let mut q = Self { stream, reader };
        match q.read_message()? {
            Message::Greeting => {}
            other => {
                return Err(QmpError::Protocol {
                    line: format!("{other:?}"),
                });
            }
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Message, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io { op: "read", source })?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        parse_message(line.trim())
    }

    fn read_reply(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            match self.read_message()? {
                Message::Return(v) => return Ok(v),
                Message::Error { class, desc } => {
                    return Err(QmpError::Command {
                        command: command.to_owned(),
                        class,
                        desc,
                    });
                }
                Message::Event(_) | Message::Greeting => {}
            }
        }
    }

    /// Runs a command and returns its `return` value.
    pub(crate) fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.stream
            .write_all(command_line(command, args).as_bytes())
            .map_err(|source| QmpError::Io { op: "write", source })?;
        self.read_reply(command)
    }

    /// Runs a command with `fd` attached (for `getfd`).
    pub(crate) fn execute_with_fd(
        &mut self,
        command: &str,
        args: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        crate::sys::send_with_fd(&self.stream, command_line(command, args).as_bytes(), fd).map_err(
            |source| QmpError::Io {
                op: "send fd",
                source,
            },
        )?;
        self.read_reply(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qmp_messages() {
        let g = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#;
        assert_eq!(parse_message(g).unwrap(), Message::Greeting);
        assert_eq!(
            parse_message(r#"{"return": {}}"#).unwrap(),
            Message::Return(json!({}))
        );
        assert_eq!(
            parse_message(r#"{"return": {"status": "running", "running": true}}"#).unwrap(),
            Message::Return(json!({"status": "running", "running": true}))
        );
        assert_eq!(
            parse_message(r#"{"error": {"class": "GenericError", "desc": "No fd named x"}}"#).unwrap(),
            Message::Error {
                class: "GenericError".into(),
                desc: "No fd named x".into()
            }
        );
        assert_eq!(
            parse_message(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#).unwrap(),
            Message::Event("STOP".into())
        );
        assert!(parse_message("not json").is_err());
        assert!(parse_message("[1,2]").is_err());
        assert!(parse_message(r#"{"what": 1}"#).is_err());
    }

    #[test]
    fn builds_command_lines() {
        assert_eq!(command_line("stop", None), "{\"execute\":\"stop\"}\n");
        let l = command_line("migrate", Some(json!({"uri": "fd:snap"})));
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["arguments"]["uri"], "fd:snap");
    }

    #[test]
    fn talks_to_a_fake_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"));
            w.write_all(b"{\"return\": {}}\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("query-status"));
            w.write_all(b"{\"event\": \"RESUME\"}\n{\"return\": {\"status\": \"running\"}}\n")
                .unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n")
                .unwrap();
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let v = q.execute("query-status", None).unwrap();
        assert_eq!(v["status"], "running");
        let e = q.execute("cont", None).unwrap_err();
        assert_eq!(e.to_string(), "cont: GenericError: nope");
        server.join().unwrap();
    }
}
