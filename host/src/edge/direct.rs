//! A plain-TCP WebSocket connection that fan-out may write to directly.
//!
//! Most broadcast updates reach an idle socket whose session has nothing to write: waking the
//! session's task to copy the bytes over costs more than the write itself. So for plain TCP
//! (not TLS, not a PROXY-wrapped stream hyper keeps) the session's stream is this wrapper,
//! and the outbox holds the same socket: fan-out writes a whole pre-built frame with one
//! non-blocking `write(2)` when nothing else is queued or half-written, and wakes the session
//! only when the socket is full (the update is queued) or took part of the frame (the rest is
//! written before any other byte). Every write the session makes — tungstenite's frames, the
//! coalesced updates — goes through [`Outbox::session_write`], under the same lock, so frames
//! never interleave.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::broadcast::outbox::{DirectSocket, Outbox};

impl DirectSocket for TcpStream {
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, bytes)
    }
}

pub struct DirectTcp {
    stream: Arc<TcpStream>,
    outbox: Arc<Outbox>,
}

impl DirectTcp {
    /// Attaches the socket to the outbox, so fan-out can write to it.
    pub fn new(stream: TcpStream, outbox: Arc<Outbox>) -> DirectTcp {
        let stream = Arc::new(stream);
        outbox.attach(stream.clone());
        DirectTcp { stream, outbox }
    }
}

impl AsyncRead for DirectTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            match self.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for DirectTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.outbox.session_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    /// The session's bytes are all in the kernel (and any half-written direct frame with
    /// them): fan-out may write directly again.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.outbox.session_flushed() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.stream.poll_write_ready(cx))?;
                }
                done => return Poll::Ready(done),
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Poll::Ready(socket2::SockRef::from(&*self.stream).shutdown(std::net::Shutdown::Write))
    }
}
