//! Natural batching of one kind of backend call: the requests that arrive while the previous
//! calls are in flight go together in the next one. Nothing waits on a timer, so a lone
//! request is sent at once; under a burst (a connect storm, a mass disconnect) one gRPC call
//! carries many. A gRPC call costs the gateway about 40 µs of CPU whatever it carries
//! (measured with `loadgen connections`), which made two calls per handshake the largest part
//! of a connection's set-up.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tonic::Status;
use tracing::Instrument as _;

/// The results of a batch, one per request and in their order.
pub type Results<Resp> = Vec<Result<Resp, Status>>;

type SendBatch<Req, Resp> =
    Arc<dyn Fn(Vec<Req>) -> futures_util::future::BoxFuture<'static, Results<Resp>> + Send + Sync>;

struct Waiting<Req, Resp> {
    request: Req,
    /// The caller's span: the batch's call is made inside the first caller's, so its trace
    /// continues into the service.
    span: tracing::Span,
    reply: oneshot::Sender<Result<Resp, Status>>,
    /// Goes without waiting out the pacing ([`Batcher::submit_next`]).
    urgent: bool,
}

/// Batches calls of one kind; see the module docs.
pub struct Batcher<Req, Resp> {
    /// The call's name in the metrics.
    name: &'static str,
    send: SendBatch<Req, Resp>,
    /// How much of a batch a request takes, and how much one batch may carry.
    weight: fn(&Req) -> usize,
    max_batch: usize,
    max_in_flight: usize,
    /// Least time between two calls, unless a full batch is waiting (see [`Batcher::paced`]).
    pacing: Duration,
    /// Started by the first call (it needs a runtime).
    queue: OnceLock<mpsc::UnboundedSender<Waiting<Req, Resp>>>,
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// `send` makes one call for a batch of at most `max_batch` requests and returns one
    /// result per request, in order; at most `max_in_flight` such calls run at once.
    pub fn new<F, Fut>(name: &'static str, max_batch: usize, max_in_flight: usize, send: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Results<Resp>> + Send + 'static,
    {
        Self::weighted(name, |_| 1, max_batch, max_in_flight, send)
    }

    /// Like [`Batcher::new`], with batches bounded by the sum of `weight` over their requests
    /// rather than by their count (a request heavier than `max_weight` goes alone).
    pub fn weighted<F, Fut>(
        name: &'static str,
        weight: fn(&Req) -> usize,
        max_weight: usize,
        max_in_flight: usize,
        send: F,
    ) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Results<Resp>> + Send + 'static,
    {
        Self {
            name,
            send: Arc::new(move |batch| Box::pin(send(batch))),
            weight,
            max_batch: max_weight.max(1),
            max_in_flight: max_in_flight.max(1),
            pacing: Duration::ZERO,
            queue: OnceLock::new(),
        }
    }

    /// Spaces calls at least `pacing` apart unless a full batch is waiting: a request that
    /// comes within `pacing` of the previous call waits for the rest of it, and the requests
    /// that arrive meanwhile share its call. One after a quiet spell still goes at once.
    /// Set before the first call: the sending task takes the pacing when it starts.
    pub fn paced(mut self, pacing: Duration) -> Self {
        self.pacing = pacing;
        self
    }

    /// Sends `request` with the others waiting now, and returns its own result.
    pub async fn call(&self, request: Req) -> Result<Resp, Status> {
        outcome(self.submit(request, tracing::Span::current())).await
    }

    /// Hands `request` over without waiting for it: the call is made whether or not the
    /// returned receiver is kept, inside `span`'s trace when it leads its batch.
    pub fn submit(&self, request: Req, span: tracing::Span) -> Pending<Resp> {
        self.enqueue(request, span, false)
    }

    /// Like [`Batcher::submit`], for a request that already waited for a call of its own
    /// (the next batch of a connection whose previous batch was in flight): its call goes as
    /// soon as a slot is free, without waiting out the pacing a second time. A single busy
    /// publisher's messages would otherwise wait for their connection's batch and then for
    /// the pacing, where several publishers' messages wait for the pacing alone.
    pub fn submit_next(&self, request: Req, span: tracing::Span) -> Pending<Resp> {
        self.enqueue(request, span, true)
    }

    fn enqueue(&self, request: Req, span: tracing::Span, urgent: bool) -> Pending<Resp> {
        let queue = self.queue.get_or_init(|| {
            let (queue, waiting) = mpsc::unbounded_channel();
            tokio::spawn(run(
                self.name,
                waiting,
                self.send.clone(),
                self.weight,
                self.max_batch,
                self.max_in_flight,
                self.pacing,
            ));
            queue
        });
        let (reply, result) = oneshot::channel();
        let waiting = Waiting {
            request,
            span,
            reply,
            urgent,
        };
        if let Err(refused) = queue.send(waiting) {
            let _ = refused
                .0
                .reply
                .send(Err(Status::unavailable("gateway shutting down")));
        }
        result
    }
}

/// The result a [`Batcher::submit`] receiver gives.
pub async fn outcome<Resp>(pending: Pending<Resp>) -> Result<Resp, Status> {
    pending
        .await
        .unwrap_or_else(|_| Err(Status::internal("batched call dropped")))
}

/// A submitted request's result, to come.
pub type Pending<Resp> = oneshot::Receiver<Result<Resp, Status>>;

/// Takes what is waiting whenever a call slot is free, and sends it as one call.
async fn run<Req: Send + 'static, Resp: Send + 'static>(
    name: &'static str,
    mut waiting: mpsc::UnboundedReceiver<Waiting<Req, Resp>>,
    send: SendBatch<Req, Resp>,
    weight: fn(&Req) -> usize,
    max_weight: usize,
    max_in_flight: usize,
    pacing: Duration,
) {
    let slots = Arc::new(Semaphore::new(max_in_flight));
    // Registered once: the macros look the key up on every call.
    roomcast_common::ops::prometheus();
    let calls = metrics::counter!("roomcast_gateway_batched_calls_total", "call" => name);
    let batched = metrics::counter!("roomcast_gateway_batched_requests_total", "call" => name);
    // A request that did not fit the previous batch: it leads the next one.
    let mut carried = None;
    let mut last_sent: Option<Instant> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match waiting.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        // While every slot is busy, requests pile up in the queue: that is the batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Gathered::new(first, weight, max_weight);
        batch.take(&mut waiting, &mut carried);
        if let Some(due) = last_sent.map(|at| at + pacing)
            && carried.is_none()
            && !batch.is_full()
            && !batch.requests.iter().any(|w| w.urgent)
            && Instant::now() < due
        {
            // Wait out the pacing, gathering what comes; a connection's next batch ends the
            // wait, and so does a batch that fills up.
            let pause = tokio::time::sleep_until(due);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    () = &mut pause => break,
                    next = waiting.recv() => {
                        let Some(next) = next else { break };
                        let urgent = next.urgent;
                        if !batch.offer(next, &mut carried) || urgent || batch.is_full() {
                            break;
                        }
                    }
                }
            }
            batch.take(&mut waiting, &mut carried);
        }
        if !pacing.is_zero() {
            last_sent = Some(Instant::now());
        }
        let batch = batch.requests;
        calls.increment(1);
        batched.increment(batch.len() as u64);
        let span = batch[0].span.clone();
        let (requests, replies): (Vec<Req>, Vec<_>) =
            batch.into_iter().map(|w| (w.request, w.reply)).unzip();
        let call = send(requests);
        tokio::spawn(
            async move {
                let results = call.await;
                let count = results.len();
                let mut results = results.into_iter();
                for reply in replies {
                    let result = results.next().unwrap_or_else(|| {
                        Err(Status::internal(format!(
                            "batch answered {count} results for more requests"
                        )))
                    });
                    // The caller may have given up (its handshake timed out): nothing to do.
                    let _ = reply.send(result);
                }
                drop(slot);
            }
            .instrument(span),
        );
    }
}

/// A batch being gathered, and how much it weighs.
struct Gathered<Req, Resp> {
    requests: Vec<Waiting<Req, Resp>>,
    load: usize,
    weight: fn(&Req) -> usize,
    max_weight: usize,
}

impl<Req, Resp> Gathered<Req, Resp> {
    fn new(first: Waiting<Req, Resp>, weight: fn(&Req) -> usize, max_weight: usize) -> Self {
        Self {
            load: weight(&first.request),
            requests: vec![first],
            weight,
            max_weight,
        }
    }

    fn is_full(&self) -> bool {
        self.load >= self.max_weight
    }

    /// Adds `next` if it fits; if not, leaves it in `carried` to lead the next batch and
    /// returns false.
    fn offer(
        &mut self,
        next: Waiting<Req, Resp>,
        carried: &mut Option<Waiting<Req, Resp>>,
    ) -> bool {
        let more = (self.weight)(&next.request);
        if self.load + more > self.max_weight {
            *carried = Some(next);
            return false;
        }
        self.load += more;
        self.requests.push(next);
        true
    }

    /// Adds what is waiting, up to the weight; a request that does not fit is left in
    /// `carried` to lead the next batch.
    fn take(
        &mut self,
        waiting: &mut mpsc::UnboundedReceiver<Waiting<Req, Resp>>,
        carried: &mut Option<Waiting<Req, Resp>>,
    ) {
        while !self.is_full() && carried.is_none() {
            let Ok(next) = waiting.try_recv() else {
                return;
            };
            if !self.offer(next, carried) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A batch call that takes 20 ms and records the sizes it saw.
    fn slow_echo(sizes: Arc<Mutex<Vec<usize>>>) -> Batcher<u32, u32> {
        Batcher::new("echo", 8, 1, move |batch: Vec<u32>| {
            sizes.lock().unwrap().push(batch.len());
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                batch
                    .into_iter()
                    .map(|n| {
                        if n == 13 {
                            Err(Status::invalid_argument("unlucky"))
                        } else {
                            Ok(n * 2)
                        }
                    })
                    .collect()
            }
        })
    }

    #[tokio::test]
    async fn a_lone_call_goes_at_once_and_a_burst_goes_together() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let batcher = Arc::new(slow_echo(sizes.clone()));
        assert_eq!(batcher.call(4).await.unwrap(), 8);
        assert_eq!(*sizes.lock().unwrap(), [1]);

        // 20 calls at once: the first goes alone, the rest wait for it and go in batches of
        // at most 8. Every caller gets its own answer, errors included.
        let calls: Vec<_> = (0..20u32)
            .map(|n| {
                let batcher = batcher.clone();
                tokio::spawn(async move { (n, batcher.call(n).await) })
            })
            .collect();
        for call in calls {
            let (n, result) = call.await.unwrap();
            match n {
                13 => assert_eq!(result.unwrap_err().code(), tonic::Code::InvalidArgument),
                n => assert_eq!(result.unwrap(), n * 2),
            }
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 21, "{sizes:?}");
        assert!(sizes.len() <= 5, "the burst was batched: {sizes:?}");
        assert!(sizes.iter().all(|&s| s <= 8), "{sizes:?}");
    }

    #[tokio::test]
    async fn weighted_batches_stay_under_their_weight_and_keep_the_order() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let batcher: Batcher<u32, u32> = Batcher::weighted(
            "weights",
            |n| *n as usize,
            10,
            1,
            move |batch: Vec<u32>| {
                seen.lock().unwrap().push(batch.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    batch.into_iter().map(Ok).collect()
                }
            },
        );
        // The first goes alone (this test's runtime has one thread: the batcher takes it while
        // this task sleeps); the rest queue behind its call, in this order.
        let first = batcher.submit(1, tracing::Span::none());
        tokio::time::sleep(Duration::from_millis(5)).await;
        let rest: Vec<_> = [6, 3, 2, 9, 20, 4]
            .into_iter()
            .map(|n| (n, batcher.submit(n, tracing::Span::none())))
            .collect();
        assert_eq!(outcome(first).await.unwrap(), 1);
        for (n, pending) in rest {
            assert_eq!(outcome(pending).await.unwrap(), n);
        }
        let batches = batches.lock().unwrap().clone();
        // 6+3 fit (2 would make 11), 2 leads the next, 9 does not fit with it, 20 goes alone.
        assert_eq!(
            batches,
            [vec![1], vec![6, 3], vec![2], vec![9], vec![20], vec![4]]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn paced_calls_wait_out_the_pacing_unless_full_or_after_a_quiet_spell() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let batcher: Batcher<u32, u32> = Batcher::new("paced", 3, 2, move |batch: Vec<u32>| {
            seen.lock().unwrap().push((batch.clone(), Instant::now()));
            async move { batch.into_iter().map(Ok).collect() }
        })
        .paced(Duration::from_millis(50));
        let start = Instant::now();
        // A first call goes at once.
        assert_eq!(batcher.call(1).await.unwrap(), 1);
        // The next ones, within the pacing: they wait for its end and share one call.
        let two = batcher.submit(2, tracing::Span::none());
        tokio::time::sleep(Duration::from_millis(10)).await;
        let three = batcher.submit(3, tracing::Span::none());
        assert_eq!(outcome(two).await.unwrap(), 2);
        assert_eq!(outcome(three).await.unwrap(), 3);
        // A full batch does not wait.
        let full: Vec<_> = [4, 5, 6]
            .into_iter()
            .map(|n| batcher.submit(n, tracing::Span::none()))
            .collect();
        for pending in full {
            outcome(pending).await.unwrap();
        }
        // After a quiet spell, a lone call goes at once again.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let quiet = Instant::now();
        assert_eq!(batcher.call(7).await.unwrap(), 7);

        let calls = calls.lock().unwrap().clone();
        let batches: Vec<Vec<u32>> = calls.iter().map(|(b, _)| b.clone()).collect();
        assert_eq!(batches, [vec![1], vec![2, 3], vec![4, 5, 6], vec![7]]);
        let at = |i: usize| calls[i].1 - start;
        assert_eq!(at(0), Duration::ZERO);
        assert_eq!(at(1), Duration::from_millis(50), "waited out the pacing");
        assert_eq!(at(2), at(1), "a full batch went at once");
        assert_eq!(
            calls[3].1, quiet,
            "a lone call after a quiet spell went at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_next_batch_is_not_paced_and_takes_along_what_waits() {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let batcher: Batcher<u32, u32> = Batcher::new("next", 8, 2, move |batch: Vec<u32>| {
            seen.lock().unwrap().push((batch.clone(), Instant::now()));
            async move { batch.into_iter().map(Ok).collect() }
        })
        .paced(Duration::from_millis(50));
        let start = Instant::now();
        assert_eq!(batcher.call(1).await.unwrap(), 1);
        // Within the pacing: a plain request waits, a connection's next batch does not, and
        // the plain one waiting goes along with it.
        let plain = batcher.submit(2, tracing::Span::none());
        tokio::time::sleep(Duration::from_millis(10)).await;
        let next = batcher.submit_next(3, tracing::Span::none());
        assert_eq!(outcome(next).await.unwrap(), 3);
        assert_eq!(outcome(plain).await.unwrap(), 2);

        let calls = calls.lock().unwrap().clone();
        let batches: Vec<Vec<u32>> = calls.iter().map(|(b, _)| b.clone()).collect();
        assert_eq!(batches, [vec![1], vec![2, 3]]);
        assert_eq!(calls[1].1 - start, Duration::from_millis(10), "not paced");
    }

    #[tokio::test]
    async fn a_dropped_receiver_does_not_stop_the_call() {
        let (tx, rx) = oneshot::channel();
        let tx = Mutex::new(Some(tx));
        let batcher: Batcher<u32, u32> = Batcher::new("dropped", 4, 1, move |batch: Vec<u32>| {
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(batch.clone());
            }
            async move { batch.into_iter().map(Ok).collect() }
        });
        drop(batcher.submit(7, tracing::Span::none()));
        let made = tokio::time::timeout(Duration::from_secs(5), rx).await;
        assert_eq!(made.unwrap().unwrap(), [7]);
    }

    #[tokio::test]
    async fn too_few_results_fail_the_rest() {
        let batcher: Batcher<u32, u32> =
            Batcher::new("empty", 4, 1, |_batch: Vec<u32>| async { Vec::new() });
        let status = batcher.call(1).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
    }
}
