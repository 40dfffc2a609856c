//! The demo domain's event generator: a deterministic, endless and valid stream of
//! Drivetribe-like events for `refold demo`, examples, tests and benchmarks.
//!
//! Pure: no I/O, no clock, no global randomness. The same [`DemoConfig`] (seed
//! included) always yields the same events.
//!
//! Streams are `user-{user_id}`, `tribe-{tribe_id}` and `post-{post_id}`; ids are
//! short strings numbered from 1: `u12`, `t3`, `p40`, `c7`.
//!
//! | event | stream | data |
//! |---|---|---|
//! | `UserRegistered` | `user-{user_id}` | `{user_id, name}` |
//! | `TribeCreated` | `tribe-{tribe_id}` | `{tribe_id, name}` |
//! | `UserJoinedTribe` | `tribe-{tribe_id}` | `{tribe_id, user_id}` |
//! | `PostPublished` | `post-{post_id}` | `{post_id, tribe_id, author_id, title, body}` |
//! | `PostLiked`, `PostUnliked`, `PostViewed` | `post-{post_id}` | `{post_id, user_id}` |
//! | `CommentAdded` | `post-{post_id}` | `{post_id, comment_id, user_id, text}` |
//!
//! The stream starts with the setup: every user registers (`u1`..), every tribe is
//! created (`t1`..), then each user joins one or two tribes. After that, events come
//! in roughly this mix: 10% `PostPublished`, 35% `PostViewed`, 30% `PostLiked`, 5%
//! `PostUnliked`, 15% `CommentAdded`, 5% `UserJoinedTribe` or new users.
//!
//! Validity, which the read models may rely on:
//! - posts are published by registered users into existing tribes;
//! - likes, unlikes, views and comments concern published posts and registered users;
//! - a user likes a post at most once until they unlike it, and `PostUnliked` comes
//!   only for a pair currently liked, so like counts never go negative;
//! - a user joins a tribe at most once.
//!
//! Popularity is skewed: most activity goes to the newest posts and to a few
//! evergreen old ones, and with [`DemoConfig::hot_share`] the first post (`p1`)
//! receives that share of all likes and views (a celebrity's post: a hot key).
//! Titles, bodies and comments come from small word lists, so full-text search has
//! words to match (`porsche`, `restoration`, `track`, ...).

use std::collections::{HashMap, HashSet, VecDeque};

use serde_json::{Value, json};

/// One demo event: the stream it goes to, its type and its `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoEvent {
    pub stream: String,
    pub event_type: String,
    pub data: Value,
}

impl DemoEvent {
    /// The event as one line of `POST /events` (NDJSON or JSON array element):
    /// `{"stream": ..., "type": ..., "data": {...}}`.
    pub fn to_json(&self) -> Value {
        json!({"stream": self.stream, "type": self.event_type, "data": self.data})
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoConfig {
    /// Seed of the generator: the same seed gives the same events.
    pub seed: u64,
    /// Users registered during the setup (at least 1; more register later).
    pub users: usize,
    /// Tribes created during the setup (at least 1).
    pub tribes: usize,
    /// Share (0..=1) of all likes and views that go to one hot post, `p1`.
    pub hot_share: f64,
}

impl Default for DemoConfig {
    /// Seed 42, 1000 users, 20 tribes, no hot post.
    fn default() -> Self {
        Self {
            seed: 42,
            users: 1000,
            tribes: 20,
            hot_share: 0.0,
        }
    }
}

/// splitmix64: tiny, fast, good enough for demo data, and stable across platforms.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// In `0..n`, skewed towards 0: the larger `power`, the stronger the skew.
    fn skewed(&mut self, n: usize, power: i32) -> usize {
        ((n as f64 * self.unit().powi(power)) as usize).min(n - 1)
    }

    fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
        words[self.below(words.len())]
    }
}

const FIRST_NAMES: &[&str] = &[
    "Ann", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kenji",
    "Lena", "Marco", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tom", "Uma", "Victor",
    "Wen", "Yusuf", "Zoe",
];
const LAST_NAMES: &[&str] = &[
    "Keller",
    "Hammond",
    "May",
    "Clarkson",
    "Rossi",
    "Novak",
    "Tanaka",
    "Okafor",
    "Silva",
    "Jensen",
    "Moreau",
    "Petrov",
    "Lindqvist",
    "Garcia",
    "Walsh",
];
const TRIBE_NAMES: &[&str] = &[
    "Classic Cars",
    "Track Days",
    "Off Road",
    "Electric Future",
    "Hot Hatches",
    "Supercars",
    "Motorbikes",
    "Rally Legends",
    "Road Trips",
    "Garage Builds",
    "Vintage Racing",
    "Drift Club",
];
const ADJECTIVES: &[&str] = &[
    "classic",
    "vintage",
    "electric",
    "turbo",
    "restored",
    "rare",
    "fast",
    "quiet",
    "muddy",
    "perfect",
    "wild",
    "forgotten",
    "loud",
    "modified",
    "original",
];
const NOUNS: &[&str] = &[
    "porsche",
    "ferrari",
    "mustang",
    "defender",
    "beetle",
    "supra",
    "mini",
    "roadster",
    "coupe",
    "hatchback",
    "motorbike",
    "engine",
    "gearbox",
    "exhaust",
    "tyres",
    "restoration",
    "drive",
    "lap",
    "rally",
    "garage",
];
const PLACES: &[&str] = &[
    "nurburgring",
    "silverstone",
    "the alps",
    "route 66",
    "the highlands",
    "goodwood",
    "monaco",
    "the desert",
    "the coast road",
    "spa",
];
const VERBS: &[&str] = &[
    "restored",
    "drove",
    "tuned",
    "raced",
    "photographed",
    "rebuilt",
    "found",
    "washed",
    "crashed",
    "sold",
];
const COMMENTS: &[&str] = &[
    "what a beauty",
    "great photos",
    "that engine sound though",
    "jealous!",
    "which tyres are those?",
    "saw one at goodwood last year",
    "how long did the restoration take?",
    "needs more track time",
    "perfect colour",
    "my dad had one of these",
    "electric is the future",
    "classic never dies",
];

/// A published post: its tribe (index into tribes, 0-based).
#[derive(Debug, Clone)]
struct Post {
    tribe: usize,
}

/// Weights that only grow by appending, sampled in O(log n): a Fenwick tree.
#[derive(Debug, Clone, Default)]
struct Weights {
    /// 1-based: `tree[i]` sums the weights of `(i - lowbit(i), i]`.
    tree: Vec<f64>,
}

impl Weights {
    fn len(&self) -> usize {
        self.tree.len().saturating_sub(1)
    }

    /// Sum of the first `i` weights.
    fn prefix(&self, mut i: usize) -> f64 {
        let mut sum = 0.0;
        while i > 0 {
            sum += self.tree[i];
            i &= i - 1;
        }
        sum
    }

    fn push(&mut self, w: f64) {
        if self.tree.is_empty() {
            self.tree.push(0.0);
        }
        let i = self.tree.len();
        let low = i & i.wrapping_neg();
        let node = w + self.prefix(i - 1) - self.prefix(i - low);
        self.tree.push(node);
    }

    /// The index (0-based) whose cumulative range holds `target` in `[0, total)`.
    fn find(&self, mut target: f64) -> usize {
        let n = self.len();
        let (mut pos, mut step) = (0, if n == 0 { 0 } else { 1 << n.ilog2() });
        while step > 0 {
            if pos + step <= n && self.tree[pos + step] <= target {
                pos += step;
                target -= self.tree[pos];
            }
            step >>= 1;
        }
        pos.min(n - 1)
    }

    fn sample(&self, rng: &mut Rng) -> usize {
        self.find(rng.unit() * self.prefix(self.len()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Registering user `i` (0-based) of the setup.
    Users(usize),
    /// Creating tribe `i` of the setup.
    Tribes(usize),
    /// Joining user `i` of the setup to its tribes.
    Joins(usize),
    /// The endless mix.
    Steady,
}

/// The generator: an endless, deterministic, valid stream of demo events.
///
/// ```
/// use refold::demo::{DemoConfig, Generator};
/// let mut g = Generator::new(DemoConfig { seed: 7, users: 50, tribes: 5, hot_share: 0.2 });
/// let events = g.take(1000);
/// assert_eq!(events[0].event_type, "UserRegistered");
/// assert_eq!(events[0].stream, "user-u1");
/// ```
#[derive(Debug, Clone)]
pub struct Generator {
    cfg: DemoConfig,
    rng: Rng,
    phase: Phase,
    /// Events decided earlier that must come next (a new user's first join, ...).
    pending: VecDeque<DemoEvent>,
    /// Registered users: `u1..=users`.
    users: usize,
    /// Per user (0-based), the tribes (0-based) joined.
    user_tribes: Vec<Vec<usize>>,
    members: HashSet<(usize, usize)>,
    /// Published posts: `p1..=posts.len()`.
    posts: Vec<Post>,
    /// Each post's lasting popularity, heavy-tailed (Pareto): a few posts get most.
    popularity: Weights,
    /// Currently liked `(post, user)` pairs (0-based), with their index in `liked`.
    liked: Vec<(usize, usize)>,
    liked_at: HashMap<(usize, usize), usize>,
    comments: usize,
}

impl Generator {
    /// A generator for `cfg`; `users` and `tribes` below 1 count as 1, `hot_share`
    /// is clamped to `0..=1`.
    pub fn new(mut cfg: DemoConfig) -> Self {
        cfg.users = cfg.users.max(1);
        cfg.tribes = cfg.tribes.max(1);
        cfg.hot_share = if cfg.hot_share.is_finite() {
            cfg.hot_share.clamp(0.0, 1.0)
        } else {
            0.0
        };
        Self {
            rng: Rng(cfg.seed),
            cfg,
            phase: Phase::Users(0),
            pending: VecDeque::new(),
            users: 0,
            user_tribes: Vec::new(),
            members: HashSet::new(),
            posts: Vec::new(),
            popularity: Weights::default(),
            liked: Vec::new(),
            liked_at: HashMap::new(),
            comments: 0,
        }
    }

    /// `n` events, as [`Generator::next_event`] would give them one by one.
    pub fn take(&mut self, n: usize) -> Vec<DemoEvent> {
        (0..n).map(|_| self.next_event()).collect()
    }

    /// The next event of the endless stream.
    pub fn next_event(&mut self) -> DemoEvent {
        if let Some(e) = self.pending.pop_front() {
            return e;
        }
        match self.phase {
            Phase::Users(i) => {
                self.phase = if i + 1 < self.cfg.users {
                    Phase::Users(i + 1)
                } else {
                    Phase::Tribes(0)
                };
                self.register_user()
            }
            Phase::Tribes(i) => {
                self.phase = if i + 1 < self.cfg.tribes {
                    Phase::Tribes(i + 1)
                } else {
                    Phase::Joins(0)
                };
                tribe_created(i)
            }
            Phase::Joins(user) => {
                self.phase = if user + 1 < self.cfg.users {
                    Phase::Joins(user + 1)
                } else {
                    Phase::Steady
                };
                let wanted = (1 + self.rng.below(2)).min(self.cfg.tribes);
                while self.user_tribes[user].len() < wanted {
                    let tribe = self.pick_tribe();
                    if let Some(e) = self.join(user, tribe) {
                        self.pending.push_back(e);
                    }
                }
                self.pending.pop_front().expect("every user joins a tribe")
            }
            Phase::Steady => self.steady(),
        }
    }

    fn steady(&mut self) -> DemoEvent {
        if self.posts.is_empty() {
            return self.publish();
        }
        let r = self.rng.unit();
        if r < 0.10 {
            self.publish()
        } else if r < 0.45 {
            self.view()
        } else if r < 0.75 {
            self.like()
        } else if r < 0.80 {
            self.unlike()
        } else if r < 0.95 {
            self.comment()
        } else if r < 0.975 {
            self.join_some_tribe()
        } else {
            self.new_user()
        }
    }

    fn register_user(&mut self) -> DemoEvent {
        let user = self.users;
        self.users += 1;
        self.user_tribes.push(Vec::new());
        let name = format!(
            "{} {}",
            self.rng.pick(FIRST_NAMES),
            self.rng.pick(LAST_NAMES)
        );
        DemoEvent {
            stream: format!("user-{}", user_id(user)),
            event_type: "UserRegistered".into(),
            data: json!({"user_id": user_id(user), "name": name}),
        }
    }

    /// A new user signs up and joins a tribe right after.
    fn new_user(&mut self) -> DemoEvent {
        let e = self.register_user();
        let tribe = self.pick_tribe();
        if let Some(join) = self.join(self.users - 1, tribe) {
            self.pending.push_back(join);
        }
        e
    }

    fn join(&mut self, user: usize, tribe: usize) -> Option<DemoEvent> {
        if !self.members.insert((user, tribe)) {
            return None;
        }
        self.user_tribes[user].push(tribe);
        Some(DemoEvent {
            stream: format!("tribe-{}", tribe_id(tribe)),
            event_type: "UserJoinedTribe".into(),
            data: json!({"tribe_id": tribe_id(tribe), "user_id": user_id(user)}),
        })
    }

    fn join_some_tribe(&mut self) -> DemoEvent {
        for _ in 0..8 {
            let user = self.rng.below(self.users);
            let tribe = self.pick_tribe();
            if let Some(e) = self.join(user, tribe) {
                return e;
            }
        }
        self.new_user()
    }

    fn publish(&mut self) -> DemoEvent {
        let author = self.rng.skewed(self.users, 2);
        let tribe = match self.user_tribes[author].len() {
            0 => self.pick_tribe(),
            n => self.user_tribes[author][self.rng.below(n)],
        };
        self.posts.push(Post { tribe });
        // Pareto with alpha 1: heavy tail, a few posts are far more popular.
        let popularity = 1.0 / (1.0 - self.rng.unit()).max(1e-9);
        self.popularity.push(popularity);
        let post = self.posts.len() - 1;
        let title = self.title();
        let body = self.body();
        DemoEvent {
            stream: format!("post-{}", post_id(post)),
            event_type: "PostPublished".into(),
            data: json!({
                "post_id": post_id(post),
                "tribe_id": tribe_id(self.posts[post].tribe),
                "author_id": user_id(author),
                "title": title,
                "body": body,
            }),
        }
    }

    fn view(&mut self) -> DemoEvent {
        let post = self.pick_post(true);
        let user = self.rng.below(self.users);
        post_event("PostViewed", post, user)
    }

    fn like(&mut self) -> DemoEvent {
        let post = self.pick_post(true);
        for _ in 0..8 {
            let user = self.rng.below(self.users);
            if !self.liked_at.contains_key(&(post, user)) {
                return self.like_by(post, user);
            }
        }
        // Nearly everyone liked it already: a newcomer signs up to like it.
        let e = self.register_user();
        let like = self.like_by(post, self.users - 1);
        self.pending.push_back(like);
        e
    }

    fn like_by(&mut self, post: usize, user: usize) -> DemoEvent {
        self.liked_at.insert((post, user), self.liked.len());
        self.liked.push((post, user));
        post_event("PostLiked", post, user)
    }

    fn unlike(&mut self) -> DemoEvent {
        if self.liked.is_empty() {
            return self.view();
        }
        let i = self.rng.below(self.liked.len());
        let (post, user) = self.liked.swap_remove(i);
        self.liked_at.remove(&(post, user));
        if let Some(&moved) = self.liked.get(i) {
            self.liked_at.insert(moved, i);
        }
        post_event("PostUnliked", post, user)
    }

    fn comment(&mut self) -> DemoEvent {
        let post = self.pick_post(false);
        let user = self.rng.below(self.users);
        self.comments += 1;
        let text = self.rng.pick(COMMENTS);
        DemoEvent {
            stream: format!("post-{}", post_id(post)),
            event_type: "CommentAdded".into(),
            data: json!({
                "post_id": post_id(post),
                "comment_id": format!("c{}", self.comments),
                "user_id": user_id(user),
                "text": text,
            }),
        }
    }

    /// A published post: `p1` with probability `hot_share` (if `hot`), else most
    /// often by lasting popularity (heavy-tailed), else one of the newest posts, now
    /// and then any post.
    fn pick_post(&mut self, hot: bool) -> usize {
        let n = self.posts.len();
        let r = self.rng.unit();
        if hot && self.rng.chance(self.cfg.hot_share) {
            0
        } else if r < 0.6 {
            self.popularity.sample(&mut self.rng)
        } else if r < 0.9 {
            n - 1 - self.rng.skewed(n, 3)
        } else {
            self.rng.below(n)
        }
    }

    /// A tribe, the first ones the most popular.
    fn pick_tribe(&mut self) -> usize {
        self.rng.skewed(self.cfg.tribes, 2)
    }

    fn title(&mut self) -> String {
        let adjective = self.rng.pick(ADJECTIVES);
        let noun = self.rng.pick(NOUNS);
        let place = self.rng.pick(PLACES);
        match self.rng.below(3) {
            0 => format!("My {adjective} {noun} at {place}"),
            1 => format!("{} {noun} {}", capitalize(adjective), self.rng.pick(NOUNS)),
            _ => format!("We {} a {adjective} {noun}", self.rng.pick(VERBS)),
        }
    }

    fn body(&mut self) -> String {
        let sentences = 1 + self.rng.below(3);
        let mut body = Vec::with_capacity(sentences);
        for _ in 0..sentences {
            let s = match self.rng.below(3) {
                0 => format!(
                    "We {} the {} {} near {}.",
                    self.rng.pick(VERBS),
                    self.rng.pick(ADJECTIVES),
                    self.rng.pick(NOUNS),
                    self.rng.pick(PLACES)
                ),
                1 => format!(
                    "The {} needed new {} after {}.",
                    self.rng.pick(NOUNS),
                    self.rng.pick(NOUNS),
                    self.rng.pick(PLACES)
                ),
                _ => format!(
                    "Nothing beats a {} {} on a sunny day.",
                    self.rng.pick(ADJECTIVES),
                    self.rng.pick(NOUNS)
                ),
            };
            body.push(s);
        }
        body.join(" ")
    }
}

fn user_id(i: usize) -> String {
    format!("u{}", i + 1)
}

fn tribe_id(i: usize) -> String {
    format!("t{}", i + 1)
}

fn post_id(i: usize) -> String {
    format!("p{}", i + 1)
}

fn tribe_created(tribe: usize) -> DemoEvent {
    let base = TRIBE_NAMES[tribe % TRIBE_NAMES.len()];
    let name = match tribe / TRIBE_NAMES.len() {
        0 => base.to_string(),
        n => format!("{base} {}", n + 1),
    };
    DemoEvent {
        stream: format!("tribe-{}", tribe_id(tribe)),
        event_type: "TribeCreated".into(),
        data: json!({"tribe_id": tribe_id(tribe), "name": name}),
    }
}

fn post_event(event_type: &str, post: usize, user: usize) -> DemoEvent {
    DemoEvent {
        stream: format!("post-{}", post_id(post)),
        event_type: event_type.into(),
        data: json!({"post_id": post_id(post), "user_id": user_id(user)}),
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cfg(seed: u64) -> DemoConfig {
        DemoConfig {
            seed,
            users: 40,
            tribes: 6,
            hot_share: 0.0,
        }
    }

    fn s<'a>(e: &'a DemoEvent, field: &str) -> &'a str {
        e.data[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} missing in {e:?}"))
    }

    /// Replays events through the rules of the domain, panicking on the first
    /// invalid one; returns the count per event type.
    fn check_valid(events: &[DemoEvent]) -> BTreeMap<String, usize> {
        let mut users = HashSet::new();
        let mut tribes = HashSet::new();
        let mut members = HashSet::new();
        let mut posts = HashSet::new();
        let mut comments = HashSet::new();
        let mut liked = HashSet::new();
        let mut counts = BTreeMap::new();
        for (i, e) in events.iter().enumerate() {
            *counts.entry(e.event_type.clone()).or_insert(0) += 1;
            let ctx = format!("event {i}: {e:?}");
            match e.event_type.as_str() {
                "UserRegistered" => {
                    let u = s(e, "user_id");
                    assert_eq!(e.stream, format!("user-{u}"), "{ctx}");
                    assert!(!s(e, "name").is_empty(), "{ctx}");
                    assert!(users.insert(u.to_string()), "registered twice: {ctx}");
                }
                "TribeCreated" => {
                    let t = s(e, "tribe_id");
                    assert_eq!(e.stream, format!("tribe-{t}"), "{ctx}");
                    assert!(tribes.insert(t.to_string()), "created twice: {ctx}");
                }
                "UserJoinedTribe" => {
                    let (t, u) = (s(e, "tribe_id"), s(e, "user_id"));
                    assert_eq!(e.stream, format!("tribe-{t}"), "{ctx}");
                    assert!(tribes.contains(t) && users.contains(u), "{ctx}");
                    assert!(members.insert((t, u)), "joined twice: {ctx}");
                }
                "PostPublished" => {
                    let p = s(e, "post_id");
                    assert_eq!(e.stream, format!("post-{p}"), "{ctx}");
                    assert!(tribes.contains(s(e, "tribe_id")), "{ctx}");
                    assert!(users.contains(s(e, "author_id")), "{ctx}");
                    assert!(!s(e, "title").is_empty() && !s(e, "body").is_empty());
                    assert!(posts.insert(p.to_string()), "published twice: {ctx}");
                }
                t @ ("PostLiked" | "PostUnliked" | "PostViewed" | "CommentAdded") => {
                    let (p, u) = (s(e, "post_id"), s(e, "user_id"));
                    assert_eq!(e.stream, format!("post-{p}"), "{ctx}");
                    assert!(posts.contains(p), "before publish: {ctx}");
                    assert!(users.contains(u), "unknown user: {ctx}");
                    match t {
                        "PostLiked" => assert!(liked.insert((p, u)), "double like: {ctx}"),
                        "PostUnliked" => assert!(liked.remove(&(p, u)), "not liked: {ctx}"),
                        "CommentAdded" => {
                            assert!(!s(e, "text").is_empty());
                            assert!(comments.insert(s(e, "comment_id")), "{ctx}");
                        }
                        _ => {}
                    }
                }
                other => panic!("unknown type {other}: {ctx}"),
            }
        }
        counts
    }

    #[test]
    fn same_seed_same_events() {
        let a = Generator::new(cfg(1)).take(5000);
        let b = Generator::new(cfg(1)).take(5000);
        assert_eq!(a, b);
        let c = Generator::new(cfg(2)).take(5000);
        assert_ne!(a, c);
        // take() and next_event() agree.
        let mut g = Generator::new(cfg(1));
        let one_by_one: Vec<_> = (0..5000).map(|_| g.next_event()).collect();
        assert_eq!(a, one_by_one);
    }

    #[test]
    fn setup_comes_first() {
        let events = Generator::new(cfg(3)).take(200);
        for (i, e) in events[..40].iter().enumerate() {
            assert_eq!(e.event_type, "UserRegistered");
            assert_eq!(e.stream, format!("user-u{}", i + 1));
        }
        for (i, e) in events[40..46].iter().enumerate() {
            assert_eq!(e.event_type, "TribeCreated");
            assert_eq!(e.data["tribe_id"], format!("t{}", i + 1));
        }
        // Each setup user joins one or two tribes, then the mix starts.
        let joins = events[46..]
            .iter()
            .take_while(|e| e.event_type == "UserJoinedTribe")
            .count();
        assert!((40..=80).contains(&joins), "{joins}");
        assert_eq!(events[46 + joins].event_type, "PostPublished");
    }

    #[test]
    fn events_are_valid() {
        for seed in 0..5 {
            check_valid(&Generator::new(cfg(seed)).take(20_000));
        }
        // Tiny and hot configurations stress the fallbacks (everyone liked it).
        let tiny = DemoConfig {
            seed: 9,
            users: 1,
            tribes: 1,
            hot_share: 1.0,
        };
        check_valid(&Generator::new(tiny).take(5_000));
        let zero = DemoConfig {
            seed: 9,
            users: 0,
            tribes: 0,
            hot_share: f64::NAN,
        };
        check_valid(&Generator::new(zero).take(1_000));
    }

    #[test]
    fn mix_is_roughly_as_documented() {
        let events = Generator::new(cfg(5)).take(100_000);
        check_valid(&events);
        let setup = events
            .iter()
            .position(|e| e.event_type == "PostPublished")
            .unwrap();
        let mix = &events[setup..];
        let share =
            |t: &str| mix.iter().filter(|e| e.event_type == t).count() as f64 / mix.len() as f64;
        let near = |t: &str, want: f64| {
            let got = share(t);
            assert!((got - want).abs() < 0.03, "{t}: {got:.3}, want ~{want}");
        };
        near("PostPublished", 0.10);
        near("PostViewed", 0.35);
        near("PostLiked", 0.30);
        near("PostUnliked", 0.05);
        near("CommentAdded", 0.15);
        // Skew: the 10 busiest posts get a large part of the likes and views.
        let mut per_post: HashMap<&str, usize> = HashMap::new();
        for e in &events {
            if matches!(e.event_type.as_str(), "PostLiked" | "PostViewed") {
                *per_post.entry(s(e, "post_id")).or_default() += 1;
            }
        }
        let mut busiest: Vec<usize> = per_post.values().copied().collect();
        busiest.sort_unstable_by(|a, b| b.cmp(a));
        let total: usize = busiest.iter().sum();
        let top: usize = busiest.iter().take(10).sum();
        assert!(
            top * 4 > total,
            "top 10 of {} posts: {top}/{total}",
            busiest.len()
        );
    }

    #[test]
    fn hot_post_gets_its_share() {
        let hot = DemoConfig {
            hot_share: 0.5,
            ..cfg(11)
        };
        let events = Generator::new(hot).take(50_000);
        check_valid(&events);
        let (mut all, mut on_hot) = (0usize, 0usize);
        for e in &events {
            if matches!(e.event_type.as_str(), "PostLiked" | "PostViewed") {
                all += 1;
                on_hot += usize::from(e.data["post_id"] == "p1");
            }
        }
        let share = on_hot as f64 / all as f64;
        assert!((0.5..0.6).contains(&share), "{share}");
    }

    #[test]
    fn weights_sample_by_weight() {
        let mut w = Weights::default();
        let ws = [1.0, 0.0, 3.0, 2.0, 0.5, 0.5, 4.0];
        for x in ws {
            w.push(x);
        }
        assert_eq!(w.prefix(7), 11.0);
        let mut acc = 0.0;
        for (i, x) in ws.iter().enumerate() {
            assert_eq!(w.prefix(i + 1), acc + x);
            if *x > 0.0 {
                assert_eq!(w.find(acc), i);
                assert_eq!(w.find(acc + x * 0.99), i);
            }
            acc += x;
        }
    }

    #[test]
    fn to_json_is_a_bulk_line() {
        let e = Generator::new(cfg(1)).next_event();
        let j = e.to_json();
        assert_eq!(j["stream"], "user-u1");
        assert_eq!(j["type"], "UserRegistered");
        assert_eq!(j["data"]["user_id"], "u1");
        assert_eq!(j.as_object().unwrap().len(), 3);
    }
}
