//! A fake Sluice agent: the real generated `sluice.v1` services on a loopback tonic server,
//! behaving as a leader, a follower that redirects, or an agent in an election.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use sluice_client::LEADER_METADATA_KEY;
use sluice_client::proto::admin_server::{Admin, AdminServer};
use sluice_client::proto::consume_request::Request as In;
use sluice_client::proto::consume_response::Response as Out;
use sluice_client::proto::consumer_server::{Consumer, ConsumerServer};
use sluice_client::proto::publisher_server::{Publisher, PublisherServer};
use sluice_client::proto::{
    Confirm, ConsumeRequest, ConsumeResponse, DeclareQueueRequest, DeclareQueueResponse,
    DeleteQueueRequest, DeleteQueueResponse, Delivery, DeliveryTag, GetQueueStatsRequest,
    GetQueueStatsResponse, ListQueuesRequest, ListQueuesResponse, Message, MessageId,
    PublishRequest, PublishResponse, PublishStreamRequest, PublishStreamResponse, QueueSpec,
    SettleRequest, SettleResponse, SettleResult,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// How a fake agent answers.
#[derive(Debug)]
pub enum Behaviour {
    /// Serves every request.
    Lead,
    /// Answers every request `UNAVAILABLE` naming this `host:port` as the leader.
    Redirect(String),
    /// Answers `UNAVAILABLE` without a leader this many times, then serves.
    Elect(AtomicU32),
    /// On a publish stream: confirms this many frames, then ends the stream with a redirect
    /// to the `host:port`. Serves every other request.
    RedirectStreamAfter(u32, String),
    /// On a consume stream: sends one delivery, then, once the first settle frame arrived,
    /// ends the stream with a redirect to the `host:port` without answering it. Serves every
    /// other request.
    RedirectConsumeAfterDelivery(String),
}

/// What a fake agent saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Requests received (stream opens count once).
    pub calls: AtomicU32,
    /// Payloads accepted, in order.
    pub published: Mutex<Vec<String>>,
}

/// One fake agent.
#[derive(Debug, Clone)]
pub struct Fake {
    name: String,
    behaviour: Arc<Behaviour>,
    /// Shared with the test.
    pub seen: Arc<Seen>,
}

/// A running fake agent; dropped or [`Running::stop`]ped, it shuts down.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub seen: Arc<Seen>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Running {
    /// `http://addr`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far.
    pub fn calls(&self) -> u32 {
        self.seen.calls.load(Ordering::SeqCst)
    }

    /// Payloads accepted so far.
    pub fn published(&self) -> Vec<String> {
        self.seen.published.lock().expect("lock").clone()
    }

    /// Shuts the server down and waits until it stopped listening.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Starts a fake agent named `name` (it reports the name in list and stats answers and in
/// delivered payloads, so tests see who answered) on a free loopback port.
pub async fn start(name: &str, behaviour: Behaviour) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    start_on(listener, name, behaviour, addr).await
}

/// Binds a free loopback port to be served later, so a redirect can name it up front.
pub async fn reserve() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

/// Starts a fake agent on an already bound listener.
pub async fn start_on(
    listener: TcpListener,
    name: &str,
    behaviour: Behaviour,
    addr: SocketAddr,
) -> Running {
    let fake = Fake {
        name: name.to_owned(),
        behaviour: Arc::new(behaviour),
        seen: Arc::new(Seen::default()),
    };
    let seen = fake.seen.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(AdminServer::new(fake.clone()))
            .add_service(PublisherServer::new(fake.clone()))
            .add_service(ConsumerServer::new(fake))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await;
    });
    Running {
        addr,
        seen,
        stop: Some(stop),
        server,
    }
}

/// `UNAVAILABLE` naming `leader` in the redirect metadata.
pub fn redirect(leader: &str) -> Status {
    let mut status = Status::unavailable("not the leader of this queue");
    status.metadata_mut().insert(
        LEADER_METADATA_KEY,
        leader.parse().expect("an ascii address"),
    );
    status
}

impl Fake {
    /// Counts the request and answers it the way this agent behaves.
    fn gate(&self) -> Result<(), Status> {
        self.seen.calls.fetch_add(1, Ordering::SeqCst);
        match &*self.behaviour {
            Behaviour::Lead
            | Behaviour::RedirectStreamAfter(..)
            | Behaviour::RedirectConsumeAfterDelivery(_) => Ok(()),
            Behaviour::Redirect(leader) => Err(redirect(leader)),
            Behaviour::Elect(left) => {
                let refuse = left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if refuse {
                    Err(Status::unavailable("election under way"))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Accepts `messages`, returning their confirms.
    fn accept(&self, messages: &[Message]) -> Vec<Confirm> {
        let mut published = self.seen.published.lock().expect("lock");
        messages
            .iter()
            .map(|m| {
                published.push(String::from_utf8_lossy(&m.payload).into_owned());
                Confirm {
                    id: Some(MessageId {
                        partition: 0,
                        offset: published.len() as u64,
                    }),
                    ..Default::default()
                }
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Admin for Fake {
    async fn declare_queue(
        &self,
        request: Request<DeclareQueueRequest>,
    ) -> Result<Response<DeclareQueueResponse>, Status> {
        self.gate()?;
        Ok(Response::new(DeclareQueueResponse {
            queue: request.into_inner().queue,
            created: true,
        }))
    }

    async fn delete_queue(
        &self,
        _request: Request<DeleteQueueRequest>,
    ) -> Result<Response<DeleteQueueResponse>, Status> {
        self.gate()?;
        Ok(Response::new(DeleteQueueResponse {
            messages_deleted: 0,
        }))
    }

    async fn list_queues(
        &self,
        _request: Request<ListQueuesRequest>,
    ) -> Result<Response<ListQueuesResponse>, Status> {
        self.gate()?;
        let queue = QueueSpec {
            name: self.name.clone(),
            ..Default::default()
        };
        Ok(Response::new(ListQueuesResponse {
            queues: vec![queue],
        }))
    }

    async fn get_queue_stats(
        &self,
        _request: Request<GetQueueStatsRequest>,
    ) -> Result<Response<GetQueueStatsResponse>, Status> {
        self.gate()?;
        Ok(Response::new(GetQueueStatsResponse {
            name: self.name.clone(),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl Publisher for Fake {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        self.gate()?;
        let confirms = self.accept(&request.into_inner().messages);
        Ok(Response::new(PublishResponse { confirms }))
    }

    type PublishStreamStream = ReceiverStream<Result<PublishStreamResponse, Status>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        self.gate()?;
        let mut frames = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            let mut answered = 0;
            while let Ok(Some(frame)) = frames.message().await {
                if let Behaviour::RedirectStreamAfter(after, leader) = &*this.behaviour
                    && answered >= *after
                {
                    let _ = tx.send(Err(redirect(leader))).await;
                    return;
                }
                let confirms = this.accept(&frame.messages);
                answered += 1;
                let response = PublishStreamResponse {
                    sequence: frame.sequence,
                    confirms,
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl Consumer for Fake {
    type ConsumeStream = ReceiverStream<Result<ConsumeResponse, Status>>;

    async fn consume(
        &self,
        request: Request<Streaming<ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        self.gate()?;
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        // One delivery whose payload names this agent; then the stream stays open.
        let delivery = Delivery {
            message: Some(Message {
                payload: self.name.clone().into_bytes(),
                ..Default::default()
            }),
            tag: Some(DeliveryTag::default()),
            ..Default::default()
        };
        let _ = tx
            .send(Ok(ConsumeResponse {
                response: Some(Out::Delivery(delivery)),
            }))
            .await;
        if let Behaviour::RedirectConsumeAfterDelivery(leader) = &*self.behaviour {
            // The stream moves once the client's first settle frame arrived, unanswered, so
            // that settle's outcome is unknown to the client.
            let leader = leader.clone();
            tokio::spawn(async move {
                while let Ok(Some(request)) = requests.message().await {
                    if matches!(request.request, Some(In::Settle(_))) {
                        break;
                    }
                }
                let _ = tx.send(Err(redirect(&leader))).await;
            });
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        // Every settle frame is answered as fully successful.
        tokio::spawn(async move {
            while let Ok(Some(request)) = requests.message().await {
                if matches!(request.request, Some(In::Settle(_))) {
                    let result = SettleResult {
                        sequence: request.sequence,
                        failures: vec![],
                    };
                    let settled = ConsumeResponse {
                        response: Some(Out::Settled(result)),
                    };
                    if tx.send(Ok(settled)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn settle(
        &self,
        _request: Request<SettleRequest>,
    ) -> Result<Response<SettleResponse>, Status> {
        self.gate()?;
        Ok(Response::new(SettleResponse { failures: vec![] }))
    }
}
