//! `raw_writer`: this machine's floor for pushing update frames to many loopback sockets.
//!
//! One thread pinned to `--writer-core` writes a pre-framed WebSocket text frame (the bytes a
//! server sends: unmasked, built once) to each of `--sockets` connections per round, with one
//! `write(2)` per socket carrying `--coalesce` frames. A child process pinned to
//! `--reader-core` holds the other ends and drains them (a process of its own: 15 000 sockets
//! per side stay under the per-process file limit). Reported: frames and writes per CPU
//! second of the writer thread, and the time of one round — the least a server on one core
//! can need to touch every listener once. Fanfare's delivery figures are read against it.
//!
//!     raw_writer --sockets 15000 --coalesce 1 --seconds 5

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// Connections written to per round.
    #[arg(long, default_value_t = 2000)]
    sockets: usize,
    /// Payload bytes of one frame (a Fanfare `likes` update is ≈100–300).
    #[arg(long, default_value_t = 100)]
    frame_bytes: usize,
    /// Frames carried by each write (1 = one write per frame).
    #[arg(long, default_value_t = 1)]
    coalesce: usize,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 0)]
    writer_core: usize,
    #[arg(long, default_value_t = 1)]
    reader_core: usize,
    /// Source addresses 127.0.0.2… the drain spreads its connections over.
    #[arg(long, default_value_t = 4)]
    source_ips: u8,
    /// Internal: be the draining child, connecting to this address.
    #[arg(long, hide = true)]
    drain: Option<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.drain {
        Some(addr) => drain(&args, addr),
        None => write_rounds(&args),
    }
}

/// The server frame header for an unmasked text frame of `len` bytes.
fn frame(len: usize) -> Vec<u8> {
    let mut bytes = vec![0x81];
    match len {
        0..=125 => bytes.push(len as u8),
        126..=65535 => {
            bytes.push(126);
            bytes.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            bytes.push(127);
            bytes.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    bytes.extend(std::iter::repeat_n(b'x', len));
    bytes
}

fn write_rounds(args: &Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--drain", &addr.to_string()])
        .args(["--sockets", &args.sockets.to_string()])
        .args(["--reader-core", &args.reader_core.to_string()])
        .args(["--source-ips", &args.source_ips.to_string()])
        .spawn()
        .context("cannot start the draining child")?;
    let mut sockets = Vec::with_capacity(args.sockets);
    while sockets.len() < args.sockets {
        let (socket, _) = listener.accept()?;
        socket.set_nodelay(true)?;
        socket.set_nonblocking(true)?;
        sockets.push(socket);
    }
    pin_to(args.writer_core)?;
    let one = frame(args.frame_bytes);
    let write: Vec<u8> = one.repeat(args.coalesce.max(1));
    let (mut writes, mut would_block) = (0u64, 0u64);
    let cpu_before = thread_cpu_seconds();
    let started = Instant::now();
    let mut rounds = 0u64;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        for socket in &mut sockets {
            match socket.write(&write) {
                Ok(n) if n == write.len() => writes += 1,
                Ok(_) => bail!("a short write to a loopback socket; raise its buffer"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => would_block += 1,
                Err(e) => return Err(e).context("write"),
            }
        }
        rounds += 1;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds() - cpu_before;
    drop(sockets);
    let _ = child.wait();
    let frames = writes * args.coalesce.max(1) as u64;
    let result = serde_json::json!({
        "sockets": args.sockets,
        "frame_bytes": one.len(),
        "coalesce": args.coalesce,
        "rounds": rounds,
        "writes": writes,
        "would_block": would_block,
        "writer_cpu_s": cpu,
        "writer_core_share": cpu / wall,
        "us_per_write": cpu * 1e6 / writes.max(1) as f64,
        "us_per_frame": cpu * 1e6 / frames.max(1) as f64,
        "frames_per_cpu_s": frames as f64 / cpu.max(1e-9),
        "round_ms": wall * 1e3 / rounds.max(1) as f64,
    });
    println!("{result}");
    Ok(())
}

/// The child: connects every socket, then reads and drops everything until the writer
/// closes. Each socket waits in epoll like a real client's (a task per socket on a
/// single-threaded tokio runtime), so the writer pays the receiver's wake-ups as a server does.
fn drain(args: &Args, addr: SocketAddr) -> anyhow::Result<()> {
    pin_to(args.reader_core)?;
    let mut sockets = Vec::with_capacity(args.sockets);
    for i in 0..args.sockets {
        let source =
            std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % args.source_ips.max(1) as usize) as u8);
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(source.into(), 0).into())?;
        socket.connect(&addr.into())?;
        let stream: TcpStream = socket.into();
        stream.set_nonblocking(true)?;
        sockets.push(stream);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        use tokio::io::AsyncReadExt;
        let mut readers = tokio::task::JoinSet::new();
        for socket in sockets {
            let mut socket = tokio::net::TcpStream::from_std(socket)?;
            readers.spawn(async move {
                let mut buffer = vec![0u8; 16 * 1024];
                while let Ok(n) = socket.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
        while readers.join_next().await.is_some() {}
        Ok::<_, anyhow::Error>(())
    })
}

fn pin_to(core: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "cannot pin to core {core}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// CPU seconds (user + system) of the calling thread.
fn thread_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        seconds(usage.ru_utime) + seconds(usage.ru_stime)
    }
}
