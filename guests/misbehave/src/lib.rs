//! A deliberately bad validator for the host's tests. Config `mode`:
//! `trap` (panics), `loop` (never returns), `alloc` (allocates without end),
//! `reject` (rejects everything), anything else accepts.

wit_bindgen::generate!({ world: "validator", path: "../../wit" });

use fanfare::plugin::host;

struct Plugin;

impl Guest for Plugin {
    fn validate(request: LikeRequest) -> Verdict {
        // Misbehave only for real traffic, so that the node's canary (user "fanfare-canary")
        // lets the plugin load; the host's tests then see each failure at call time.
        if request.user == "fanfare-canary" && host::config("fail_canary").is_none() {
            return Verdict::Accept;
        }
        match host::config("mode").as_deref() {
            Some("trap") => panic!("misbehave: trapping on purpose"),
            Some("loop") => {
                let mut spins: u64 = 0;
                loop {
                    spins = std::hint::black_box(spins.wrapping_add(1));
                }
            }
            Some("alloc") => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            Some("reject") => Verdict::Reject("misbehave rejects everything".into()),
            _ => Verdict::Accept,
        }
    }
}

export!(Plugin);
