//! The endpoint of `sluice local`: one address that keeps answering while any agent runs.
//!
//! Each connection is passed through, bytes as they are, to the first agent (in order) that
//! accepts it, so a restarting agent costs its open connections but never the endpoint. The
//! client then follows redirects to whichever agent leads a queue, as it would from behind a
//! sidecar.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The listening endpoint and the agents it passes connections to.
#[derive(Debug)]
pub struct Front {
    listener: TcpListener,
}

impl Front {
    /// Binds `listen` (port 0: a free port).
    pub async fn bind(listen: SocketAddr) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(listen).await?,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Passes connections to `agents`, in order of preference, until the task is aborted.
    pub fn serve(self, agents: Vec<SocketAddr>) -> JoinHandle<()> {
        let agents: Arc<[SocketAddr]> = agents.into();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = self.listener.accept().await else {
                    // Out of file descriptors or similar: the next accept may succeed.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                tokio::spawn(pass_through(inbound, Arc::clone(&agents)));
            }
        })
    }
}

/// Connects `inbound` to the first agent that accepts and copies both ways until either side
/// closes; with no agent up the connection is closed, which a client reports as unavailable.
async fn pass_through(mut inbound: TcpStream, agents: Arc<[SocketAddr]>) {
    for &agent in agents.iter() {
        if let Ok(mut outbound) = TcpStream::connect(agent).await {
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            // Either side closing or resetting ends the pair; nothing to report.
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            return;
        }
    }
}
