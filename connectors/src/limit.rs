//! A concurrency limit whose bound can change while permits are out (a
//! function's limit follows its ready replicas); permits are units (calls)
//! or weights (bytes).

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug)]
pub struct Limit {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Debug)]
struct State {
    used: usize,
    max: usize,
}

/// Units of a [`Limit`], given back on drop.
#[derive(Debug)]
pub struct Permit {
    limit: Arc<Limit>,
    n: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Ok(mut s) = self.limit.state.lock() {
            s.used = s.used.saturating_sub(self.n);
        }
        self.limit.notify.notify_waiters();
    }
}

impl Limit {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State { used: 0, max }),
            notify: Notify::new(),
        })
    }

    /// Changes the bound; permits already out stay valid.
    pub fn set_max(&self, max: usize) {
        if let Ok(mut s) = self.state.lock() {
            s.max = max;
        }
        self.notify.notify_waiters();
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.state.lock().map(|s| s.max).unwrap_or(0)
    }

    pub fn in_use(&self) -> usize {
        self.state.lock().map(|s| s.used).unwrap_or(0)
    }

    pub fn available(&self) -> usize {
        self.state
            .lock()
            .map(|s| s.max.saturating_sub(s.used))
            .unwrap_or(0)
    }

    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        self.try_acquire_n(1)
    }

    pub async fn acquire(self: &Arc<Self>) -> Permit {
        self.acquire_n(1).await
    }

    /// `n` units if they fit now. More than the bound fits when nothing is
    /// out (one message larger than a byte budget still goes, alone).
    pub fn try_acquire_n(self: &Arc<Self>, n: usize) -> Option<Permit> {
        let mut s = self.state.lock().ok()?;
        if s.used + n <= s.max || (s.used == 0 && s.max > 0) {
            s.used += n;
            Some(Permit {
                limit: Arc::clone(self),
                n,
            })
        } else {
            None
        }
    }

    /// `n` units, once they fit (see [`Limit::try_acquire_n`]).
    pub async fn acquire_n(self: &Arc<Self>, n: usize) -> Permit {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(p) = self.try_acquire_n(n) {
                return p;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn bound_holds_and_can_change() {
        let l = Limit::new(2);
        let a = l.try_acquire().unwrap();
        let _b = l.try_acquire().unwrap();
        assert!(l.try_acquire().is_none());
        assert_eq!(l.in_use(), 2);

        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.acquire().await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.in_use(), 2);

        // Lowering the bound below what is out blocks new permits until enough return.
        l.set_max(1);
        drop(c);
        assert!(l.try_acquire().is_none());
        l.set_max(3);
        assert!(l.try_acquire().is_some());
    }

    #[test]
    fn weighted_permits_fit_the_bound_and_an_oversized_one_goes_alone() {
        let l = Limit::new(100);
        let a = l.try_acquire_n(60).unwrap();
        assert!(l.try_acquire_n(50).is_none());
        let b = l.try_acquire_n(40).unwrap();
        assert_eq!(l.in_use(), 100);
        drop(a);
        assert_eq!(l.in_use(), 40);
        assert!(l.try_acquire_n(500).is_none(), "not beside another");
        drop(b);
        let big = l.try_acquire_n(500).expect("alone");
        assert!(l.try_acquire_n(1).is_none());
        drop(big);
        assert_eq!(l.in_use(), 0);
    }
}
