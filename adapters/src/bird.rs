//! A client for BIRD's control socket, enough to switch a protocol on or off.
//!
//! BIRD's client protocol is line based: the daemon greets with a `0001`
//! line; each command is answered by lines that start with a four-digit code,
//! where a dash after the code means "more lines follow" and a space ends the
//! reply. Codes from 8000 up are errors (9001 is a parse error, 8003 "no
//! protocols match").

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long one exchange with BIRD may take.
const BIRD_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a BIRD command failed.
#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    /// The socket could not be used.
    #[error("BIRD socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// BIRD answered with an error code.
    #[error("BIRD refused: {0}")]
    Refused(String),
    /// BIRD did not answer in time.
    #[error("BIRD did not answer within {0:?}")]
    Timeout(Duration),
    /// The protocol name could inject another command.
    #[error("invalid protocol name {0:?}")]
    BadName(String),
}

/// Talks to one BIRD daemon.
#[derive(Debug, Clone)]
pub struct BirdClient {
    socket: PathBuf,
}

impl BirdClient {
    /// A client for BIRD's control socket at `socket`.
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    /// Runs `enable NAME` or `disable NAME`; returns BIRD's final reply line.
    pub async fn set_protocol(&self, protocol: &str, enabled: bool) -> Result<String, BirdError> {
        if protocol.is_empty()
            || !protocol
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(BirdError::BadName(protocol.to_owned()));
        }
        let verb = if enabled { "enable" } else { "disable" };
        self.command(&format!("{verb} {protocol}")).await
    }

    /// Sends one command and reads its whole reply.
    pub async fn command(&self, command: &str) -> Result<String, BirdError> {
        tokio::time::timeout(BIRD_TIMEOUT, self.exchange(command))
            .await
            .map_err(|_| BirdError::Timeout(BIRD_TIMEOUT))?
    }

    async fn exchange(&self, command: &str) -> Result<String, BirdError> {
        let io = |source| BirdError::Io {
            path: self.socket.clone(),
            source,
        };
        let stream = UnixStream::connect(&self.socket).await.map_err(io)?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        // The greeting.
        read_reply(&mut lines).await.map_err(io)?;
        write
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(io)?;
        let (code, text) = read_reply(&mut lines).await.map_err(io)?;
        if code >= 8000 {
            return Err(BirdError::Refused(format!("{code} {text}")));
        }
        Ok(text)
    }
}

/// Reads lines until one ends the reply; returns its code and all text.
async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
) -> std::io::Result<(u32, String)> {
    let mut text = Vec::new();
    loop {
        let Some(line) = lines.next_line().await? else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "BIRD closed the socket",
            ));
        };
        let code = line.get(..4).and_then(|c| c.parse::<u32>().ok());
        let sep = line.as_bytes().get(4).copied();
        match (code, sep) {
            (Some(code), Some(b' ')) => {
                text.push(line[5..].to_owned());
                return Ok((code, text.join("\n")));
            }
            (Some(_), Some(b'-')) => text.push(line[5..].to_owned()),
            // A continuation line starts with a space.
            _ => text.push(line.trim_start().to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake BIRD that greets, answers one command and records it.
    async fn fake_bird(listener: UnixListener, answer: &'static str) -> String {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        write.write_all(b"0001 BIRD 2.0.12 ready.\n").await.unwrap();
        let mut lines = BufReader::new(read).lines();
        let command = lines.next_line().await.unwrap().unwrap();
        write.write_all(answer.as_bytes()).await.unwrap();
        command
    }

    #[tokio::test]
    async fn enable_and_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bird.ctl");
        let client = BirdClient::new(path.clone());

        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_bird(listener, "0011-subnets: enabled\n0000 \n"));
        let reply = client.set_protocol("subnets", true).await.unwrap();
        assert_eq!(server.await.unwrap(), "enable subnets");
        assert!(reply.contains("subnets: enabled"), "{reply}");

        std::fs::remove_file(&path).unwrap();
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_bird(listener, "8003 No protocols match\n"));
        let err = client.set_protocol("nope", false).await.unwrap_err();
        assert_eq!(server.await.unwrap(), "disable nope");
        assert!(
            matches!(err, BirdError::Refused(ref m) if m.starts_with("8003")),
            "{err}"
        );

        assert!(matches!(
            client.set_protocol("x\nrestart", true).await,
            Err(BirdError::BadName(_))
        ));
    }
}
