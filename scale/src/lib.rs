//! Scale-out for a partner whose data outgrows one machine: the Apache Ballista scheduler and
//! executor that the `cleanroom` binary runs (`cleanroom scheduler`, `cleanroom executor`).
//!
//! A node with `engine = { ballista = "df://HOST:PORT" }` sends its dataset plans (reading,
//! filtering, projecting, SQL views) to the scheduler; the executors read the files and stream
//! the rows back; the node normalises, blinds and talks to the partner as before. The cluster is
//! the partner's own: it runs inside its infrastructure, beside the node, and never sees a job
//! key or a peer's byte.
//!
//! Each executor counts the tasks and rows it ran ([`executor::Counters`]) and logs them after
//! every task, so an operator (and the end-to-end test) can see that the work was shared.

pub mod executor;
pub mod scheduler;
