//! A web-like tree for benchmarks, shared by `codafs bench` and the `codafs-benches` crate so
//! both measure the same files: log-normal sizes (median about 8 KiB, 200 B..1 MiB) from a fixed
//! seed, 50 directories, and a Zipf request distribution over the files.
use std::path::Path;

use rand::{Rng, SeedableRng};

/// Directories the files are spread over.
pub const DIRS: usize = 50;

/// Web-like sizes: log-normal around 8 KiB, from 200 B to 1 MiB.
fn size_of(rng: &mut rand::rngs::StdRng) -> usize {
    // Box-Muller normal sample.
    let (u1, u2): (f64, f64) = (rng.gen_range(1e-9..1.0), rng.gen());
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    ((8192.0 * (1.1 * z).exp()) as usize).clamp(200, 1 << 20)
}

/// Cumulative Zipf(s) distribution over `n` ranks.
pub fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut cdf: Vec<f64> = (1..=n)
        .map(|k| {
            acc += 1.0 / (k as f64).powf(s);
            acc
        })
        .collect();
    for v in &mut cdf {
        *v /= acc;
    }
    cdf
}

/// A rank drawn from `cdf` (as made by [`zipf_cdf`]).
pub fn zipf_pick(cdf: &[f64], rng: &mut impl Rng) -> usize {
    let u: f64 = rng.gen();
    cdf.partition_point(|c| *c < u).min(cdf.len().saturating_sub(1))
}

/// The path of file `i` inside the tree.
pub fn relpath(i: usize) -> String {
    format!("d{:02}/page{i:05}.html", i % DIRS)
}

/// Opens, reads whole and closes a file; the bytes read.
pub fn open_read_close(p: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut buf = [0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// The tree's sizes.
pub struct WebTree {
    pub sizes: Vec<usize>,
}

impl WebTree {
    pub fn median(&self) -> usize {
        let mut sorted = self.sizes.clone();
        sorted.sort_unstable();
        sorted.get(sorted.len() / 2).copied().unwrap_or(0)
    }

    pub fn total_bytes(&self) -> usize {
        self.sizes.iter().sum()
    }
}

/// The first `n` files of the tree in order: (relative path, content). Always the same for the
/// same `n` (seeded).
pub fn web_files(n: usize) -> impl Iterator<Item = (String, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    (0..n).map(move |i| {
        let len = size_of(&mut rng);
        let data: Vec<u8> = (0..len).map(|j| b"abcdefghij<>/ \n"[(i + j) % 15]).collect();
        (relpath(i), data)
    })
}

/// Writes the first `n` files of the tree to `local` (in [`DIRS`] directories).
pub fn write_web_tree(local: &Path, n: usize) -> std::io::Result<WebTree> {
    for d in 0..DIRS {
        std::fs::create_dir_all(local.join(format!("d{d:02}")))?;
    }
    let mut sizes = Vec::new();
    for (path, data) in web_files(n) {
        sizes.push(data.len());
        std::fs::write(local.join(path), &data)?;
    }
    Ok(WebTree { sizes })
}

/// A minimal nginx configuration serving `root` on 127.0.0.1:`port`, with its pid, logs and
/// temporary files under `dir` (its prefix), so it runs beside any system nginx, also as root.
/// Shared by `codafs bench` and the web-farm test.
pub fn nginx_conf(dir: &Path, port: u16, root: &Path, connections: usize) -> String {
    let t = dir.join("tmp").display().to_string();
    format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections {connections}; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {t}/body;\n  proxy_temp_path {t}/proxy;\n\
         fastcgi_temp_path {t}/fastcgi;\n  uwsgi_temp_path {t}/uwsgi;\n  scgi_temp_path {t}/scgi;\n\
         server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
        d = dir.display(),
        root = root.display(),
    )
}

/// One nginx serving `root` on a free loopback port with [`nginx_conf`], its files under `dir`;
/// killed when dropped. Shared by `codafs bench` and the web-farm test.
pub struct Nginx {
    child: std::process::Child,
    pub port: u16,
}

impl Nginx {
    /// Starts nginx and waits (at most 5 s) until it accepts connections.
    pub fn start(dir: &Path, root: &Path, connections: usize) -> std::io::Result<Nginx> {
        use std::process::{Command, Stdio};
        std::fs::create_dir_all(dir.join("tmp"))?;
        let port = codafs_common::ports::free_loopback_port()?;
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, nginx_conf(dir, port, root, connections))?;
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("starting nginx: {e}")))?;
        let n = Nginx { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(n);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "nginx did not listen on 127.0.0.1:{port} within 5 s (see {}/error.log)",
                dir.display()
            ),
        ))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
