//! Docs are tests: every shell block of `README.md` and `docs/*.md` runs, in order, the way a
//! reader types it, and where the docs show output its shape is checked. The blocks are read
//! from the markdown at test time, so the test follows the docs by itself; nothing here copies
//! a command. The convention (what runs, what is illustrative, what counts as shown output) is
//! described in `docs/testing.md#docs-are-tests`; in short:
//!
//! - A fenced block tagged `sh`, `bash` or `shell` runs. `sh illustrative` does not, and the
//!   prose just above it must say "illustrative" so that the reader sees it too. Blocks whose
//!   every command is a build, an install, a benchmark script or `./scripts/test` itself are
//!   skipped, with the reason in [`skip_reason`].
//! - `cargo run --release -p skein [--features F] --` is rewritten to `skein`; `skein` and
//!   `skein-node` are the binaries cargo built for this test (a directory of symlinks first on
//!   `PATH`).
//! - Each doc runs in a sandbox of its own: a private `HOME` (no `XDG_*` variables, no
//!   `SKEIN_*` variables from the caller), a scratch working directory whose entries are
//!   symlinks to the repository root's (so `models/...` paths work and files the docs write,
//!   like `./coord` or `acme-key.json`, do not land in the checkout), and a network namespace
//!   of its own with only loopback up, so the docs' fixed ports (`127.0.0.1:7070`,
//!   `localhost:8080`) stay as written and two docs can run at once.
//! - Shell variables carry from one block to the next (as in one terminal). `skein up`,
//!   `skein coordinator` and `skein-node` run in the background; the next command runs once
//!   the server prints its ready line ([`ServerKind::ready_line`]). Starting `skein up` or
//!   `skein coordinator` first stops (Ctrl-C) the servers already running: they take the same
//!   ports, so a reader stops them too. A doc that does not start a mesh itself presupposes
//!   one: the test starts a plain `skein up` before its first block.
//! - Shown output: a trailing comment `# {...}` or `# 401`, comment lines right under a command
//!   (JSON, a table header with rows, or text), and a `text` block right after a shell block
//!   (the output of its last command, or of the server it started). Values are illustrative,
//!   so what is checked is the shape: JSON field names and value types, table columns, and
//!   text with ids, numbers and `…`/`<placeholder>` parts matched loosely.
//!
//! Running a mesh in a network namespace needs root and iproute2; without them the run test
//! prints why it skips, and fails instead when `SKEIN_EXPECT_ROOT` is set (as `.ci/run` does).
//! The GPU blocks (`--features gpu`, `--backend wgpu`) need a Vulkan adapter (lavapipe counts):
//! without a Vulkan driver they are skipped with a message, unless `SKEIN_EXPECT_GPU` is set.

// Deadlines in this synchronous test use the wall clock; there is no tokio runtime to pause.
#![allow(clippy::disallowed_types)]

use anyhow::{bail, ensure, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long one script step (the commands between two servers) may take. The longest is a
/// `skein bench --duration 10s`: warm-up, then 10 s through the mesh and 10 s in process.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a server may take to print its ready line (`skein up` waits up to 2 minutes for
/// the models to load before it prints it).
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a server may take to stop after Ctrl-C.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Docs run at the same time (each in its own namespace); the machine in CI has 2 cores.
const PARALLEL_DOCS: usize = 2;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

/// `README.md` and every `docs/*.md`, sorted; `SKEIN_DOCS=README.md,docs/quickstart.md` picks
/// some (for working on one doc).
fn doc_files() -> Result<Vec<String>> {
    let root = repo_root();
    let mut files = vec!["README.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(root.join("docs"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    files.extend(docs);
    if let Ok(only) = std::env::var("SKEIN_DOCS") {
        let want: Vec<&str> = only.split(',').map(str::trim).collect();
        for w in &want {
            ensure!(
                files.iter().any(|f| f == w),
                "SKEIN_DOCS names {w}, not a doc"
            );
        }
        files.retain(|f| want.contains(&f.as_str()));
    }
    Ok(files)
}

// ---------------------------------------------------------------------------------------------
// Markdown: fenced blocks
// ---------------------------------------------------------------------------------------------

/// A fenced block of a markdown file.
#[derive(Debug, Clone)]
struct Fence {
    /// 1-based line of the opening fence.
    line: usize,
    /// The first word of the info string (`sh`, `text`, ...).
    lang: String,
    /// The other words of the info string (`illustrative`).
    tags: Vec<String>,
    body: Vec<String>,
    /// The text between the previous fence (or heading) and this one: the paragraph a reader
    /// sees just above the block.
    prose: String,
    /// Whether only blank lines separate this block from the previous fence.
    follows_fence: bool,
}

fn fences(md: &str) -> Result<Vec<Fence>> {
    let mut out = Vec::new();
    let mut prose = String::new();
    let mut lines = md.lines().enumerate();
    let mut follows_fence = false;
    while let Some((i, line)) = lines.next() {
        if let Some(info) = line.strip_prefix("```") {
            let mut words = info.split_whitespace().map(str::to_string);
            let lang = words.next().unwrap_or_default();
            let tags = words.collect();
            let mut body = Vec::new();
            let mut closed = false;
            for (_, l) in lines.by_ref() {
                if l.trim_end() == "```" {
                    closed = true;
                    break;
                }
                body.push(l.to_string());
            }
            ensure!(closed, "line {}: code block not closed", i + 1);
            out.push(Fence {
                line: i + 1,
                lang,
                tags,
                body,
                prose: std::mem::take(&mut prose),
                follows_fence,
            });
            follows_fence = true;
        } else {
            if line.starts_with('#') {
                prose.clear();
            }
            if !line.trim().is_empty() {
                follows_fence = false;
                prose.push_str(line);
                prose.push('\n');
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Shell: splitting a block into commands
// ---------------------------------------------------------------------------------------------

/// Lexical context while scanning shell text.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ctx {
    Single,
    Double,
    /// `$(...)` (or `$((...))`), with the depth of plain parentheses inside it.
    Subst(u32),
    Backtick,
}

#[derive(Debug, Default)]
struct LineScan {
    /// Byte offset of a comment's `#`.
    comment: Option<usize>,
    /// The line ends with a backslash outside quotes: the command goes on.
    continued: bool,
    /// Here-documents opened on this line: (delimiter, `<<-` strips leading tabs).
    heredocs: Vec<(String, bool)>,
}

/// Scans one line of shell, carrying quote and substitution context in `stack`. Enough of the
/// shell grammar for the docs: quotes, `$(...)` nested in double quotes, backslashes, comments
/// and here-documents.
fn scan_line(line: &str, stack: &mut Vec<Ctx>) -> LineScan {
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let at = |k: usize| chars.get(k).map(|&(_, c)| c);
    let mut scan = LineScan::default();
    let mut k = 0;
    while k < chars.len() {
        let (pos, c) = chars[k];
        match stack.last().copied() {
            Some(Ctx::Single) => {
                if c == '\'' {
                    stack.pop();
                }
            }
            Some(Ctx::Double) => match c {
                '\\' => k += 1,
                '"' => {
                    stack.pop();
                }
                '$' if at(k + 1) == Some('(') => {
                    stack.push(Ctx::Subst(0));
                    k += 1;
                }
                '`' => stack.push(Ctx::Backtick),
                _ => {}
            },
            Some(Ctx::Backtick) => match c {
                '\\' => k += 1,
                '`' => {
                    stack.pop();
                }
                _ => {}
            },
            top => match c {
                '\\' => {
                    if k + 1 == chars.len() {
                        scan.continued = true;
                    }
                    k += 1;
                }
                '\'' => stack.push(Ctx::Single),
                '"' => stack.push(Ctx::Double),
                '`' => stack.push(Ctx::Backtick),
                '$' if at(k + 1) == Some('(') => {
                    stack.push(Ctx::Subst(0));
                    k += 1;
                }
                '#' if top.is_none() && (k == 0 || chars[k - 1].1.is_whitespace()) => {
                    scan.comment = Some(pos);
                    break;
                }
                '(' => {
                    if let Some(Ctx::Subst(d)) = stack.last_mut() {
                        *d += 1;
                    }
                }
                ')' => match stack.last_mut() {
                    Some(Ctx::Subst(0)) => {
                        stack.pop();
                    }
                    Some(Ctx::Subst(d)) => *d -= 1,
                    _ => {}
                },
                '<' if top.is_none() && at(k + 1) == Some('<') && at(k + 2) != Some('<') => {
                    k += 2;
                    let strip = at(k) == Some('-');
                    if strip {
                        k += 1;
                    }
                    while at(k).is_some_and(|c| c == ' ') {
                        k += 1;
                    }
                    let mut word = String::new();
                    if let Some(q @ ('\'' | '"')) = at(k) {
                        k += 1;
                        while let Some(c) = at(k) {
                            k += 1;
                            if c == q {
                                break;
                            }
                            word.push(c);
                        }
                    } else {
                        while let Some(c) = at(k) {
                            if c.is_whitespace() || ";|&<>()".contains(c) {
                                break;
                            }
                            word.push(c);
                            k += 1;
                        }
                    }
                    scan.heredocs.push((word, strip));
                    continue;
                }
                _ => {}
            },
        }
        k += 1;
    }
    scan
}

/// One command of a shell block, with the output the doc shows for it.
#[derive(Debug, Clone)]
struct Cmd {
    /// 1-based line in the markdown file.
    line: usize,
    /// The command as the doc writes it, comments removed (here-documents kept).
    code: String,
    /// A comment on the command's (last) line.
    trailing: Option<String>,
    /// Comment lines right under the command (no blank line between): its output.
    comments: Vec<String>,
}

impl Cmd {
    /// The command's words, split on whitespace (enough to find the program and its verb).
    fn words(&self) -> Vec<&str> {
        self.code
            .split_whitespace()
            .filter(|w| *w != "\\")
            .collect()
    }

    /// The first line, for messages.
    fn head(&self) -> String {
        let first = self.code.lines().next().unwrap_or("").trim_end();
        if self.code.trim_end().contains('\n') {
            format!("{first} ...")
        } else {
            first.to_string()
        }
    }
}

/// Splits a block's lines into commands. Comment lines after a blank line (or at the start)
/// are prose; comment lines right under a command are its shown output.
fn split_commands(body: &[String], first_line: usize) -> Result<Vec<Cmd>> {
    let mut cmds: Vec<Cmd> = Vec::new();
    let mut attached = false;
    let mut i = 0;
    while i < body.len() {
        let t = body[i].trim();
        if t.is_empty() {
            attached = false;
            i += 1;
            continue;
        }
        if let Some(c) = t.strip_prefix('#') {
            if attached {
                if let Some(cmd) = cmds.last_mut() {
                    cmd.comments.push(c.trim().to_string());
                }
            }
            i += 1;
            continue;
        }
        let start = i;
        let mut stack = Vec::new();
        let mut code = String::new();
        let trailing;
        loop {
            let line = &body[i];
            let scan = scan_line(line, &mut stack);
            i += 1;
            match scan.comment {
                Some(c) => code.push_str(line[..c].trim_end()),
                None => code.push_str(line),
            }
            code.push('\n');
            for (delim, strip) in &scan.heredocs {
                loop {
                    ensure!(
                        i < body.len(),
                        "line {}: here-document `{delim}` not closed",
                        first_line + start
                    );
                    let l = &body[i];
                    i += 1;
                    code.push_str(l);
                    code.push('\n');
                    let cmp = if *strip {
                        l.trim_start_matches('\t')
                    } else {
                        l
                    };
                    if cmp == delim {
                        break;
                    }
                }
            }
            if stack.is_empty() && !scan.continued {
                trailing = scan.comment.map(|c| line[c + 1..].trim().to_string());
                break;
            }
            ensure!(
                i < body.len(),
                "line {}: the command does not end (an open quote or a trailing backslash)",
                first_line + start
            );
        }
        cmds.push(Cmd {
            line: first_line + start,
            code,
            trailing,
            comments: Vec::new(),
        });
        attached = true;
    }
    Ok(cmds)
}

/// `cargo run --release -p skein [--features F] -- ARGS` becomes `skein ARGS`.
fn rewrite_cargo_run(code: &str) -> String {
    const RUN: &str = "cargo run --release -p skein ";
    let mut out = String::new();
    let mut rest = code;
    while let Some(p) = rest.find(RUN) {
        out.push_str(&rest[..p]);
        let mut after = &rest[p + RUN.len()..];
        if let Some(f) = after.strip_prefix("--features ") {
            after = f.split_once(' ').map_or("", |(_, r)| r);
        }
        match after.strip_prefix("--") {
            Some(args) => {
                out.push_str("skein");
                rest = args;
            }
            None => {
                out.push_str(RUN);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The program a command runs, after `NAME=value` assignments and `time`.
fn program<'a>(words: &[&'a str]) -> (Option<&'a str>, usize) {
    let mut k = 0;
    while let Some(w) = words.get(k) {
        let assignment = w.split_once('=').is_some_and(|(n, _)| {
            !n.is_empty()
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !n.starts_with(|c: char| c.is_ascii_digit())
        });
        if assignment || *w == "time" {
            k += 1;
        } else {
            return (Some(w), k);
        }
    }
    (None, k)
}

/// Why a command is not run although it is meant to be typed, or `None`.
fn skip_reason(words: &[&str]) -> Option<&'static str> {
    let (prog, k) = program(words);
    let prog = prog?;
    Some(match prog {
        "./scripts/test" | "scripts/test" => {
            "the test command itself: it runs this test (and every other)"
        }
        "cargo" => match words.get(k + 1) {
            Some(&"build") | Some(&"install") => {
                "a build: the test runs the binaries cargo test built"
            }
            _ => return None,
        },
        p if p.starts_with("scripts/bench-") || p.starts_with("./scripts/bench-") => {
            "a benchmark script: it builds release binaries and runs for minutes; its \
             figures are recorded in docs/benchmarks.md"
        }
        p if p.starts_with("target/release/") => {
            "a release binary (a benchmark run): cargo test builds debug binaries"
        }
        "apt-get" | "apt" => "installs system packages (.ci/run does this for CI)",
        _ => return None,
    })
}

/// A long-running command: the test starts it in the background and waits for its ready line.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ServerKind {
    Up,
    Coordinator,
    Node,
}

impl ServerKind {
    fn of(words: &[&str]) -> Option<ServerKind> {
        let (prog, k) = program(words);
        let args = &words[(k + 1).min(words.len())..];
        if args
            .iter()
            .any(|a| matches!(*a, "--help" | "-h" | "--version" | "-V"))
        {
            return None;
        }
        match prog? {
            "skein" => {
                let mut a = args.iter();
                while let Some(w) = a.next() {
                    match *w {
                        "--profile" | "--log" => {
                            a.next();
                        }
                        w if w.starts_with("--") => {}
                        "up" => return Some(ServerKind::Up),
                        "coordinator" => return Some(ServerKind::Coordinator),
                        _ => return None,
                    }
                }
                None
            }
            "skein-node" => Some(ServerKind::Node),
            _ => None,
        }
    }

    /// What the server prints once it serves (on stdout, or for `skein-node` in its log).
    fn ready_line(self) -> &'static str {
        match self {
            // The last line `up` prints: the models are loaded and the gateway serves.
            ServerKind::Up => "Press Ctrl-C to stop.",
            ServerKind::Coordinator => "KServe V2 HTTP gateway:",
            // Logged once the node has joined and its first heartbeat was answered.
            ServerKind::Node => "node serving",
        }
    }

    /// Whether starting it takes the ports of a mesh already running (so that one stops first).
    fn takes_mesh_ports(self) -> bool {
        matches!(self, ServerKind::Up | ServerKind::Coordinator)
    }
}

// ---------------------------------------------------------------------------------------------
// Shown output: what the docs show, and how it is compared
// ---------------------------------------------------------------------------------------------

/// The shape of a JSON value as a doc shows it: `…` (or `...`) stands for any value, and as a
/// member of an object it says the object has more fields than shown.
#[derive(Debug, Clone, PartialEq)]
enum Shape {
    Any,
    Null,
    Bool,
    Num,
    Str,
    Arr(Vec<Shape>),
    /// Fields, and whether more may follow (a `…` member).
    Obj(Vec<(String, Shape)>, bool),
}

struct ShapeParser {
    s: Vec<char>,
    i: usize,
}

impl ShapeParser {
    /// Parses the JSON value at the start of `text`; what follows it (a note) is ignored.
    fn parse(text: &str) -> Result<Shape> {
        let mut p = ShapeParser {
            s: text.chars().collect(),
            i: 0,
        };
        p.value()
            .with_context(|| format!("the doc's JSON `{text}` (at character {})", p.i))
    }

    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_whitespace()) {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &str) -> bool {
        let n = lit.chars().count();
        if self.s.len() >= self.i + n && self.s[self.i..self.i + n].iter().copied().eq(lit.chars())
        {
            self.i += n;
            true
        } else {
            false
        }
    }

    fn ellipsis(&mut self) -> bool {
        self.eat("…") || self.eat("...")
    }

    fn string(&mut self) -> Result<String> {
        ensure!(self.eat("\""), "expected a string");
        let mut out = String::new();
        loop {
            match self.s.get(self.i) {
                None => bail!("unterminated string"),
                Some('"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some('\\') => {
                    out.push(*self.s.get(self.i + 1).unwrap_or(&'\\'));
                    self.i += 2;
                }
                Some(&c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
    }

    fn value(&mut self) -> Result<Shape> {
        self.ws();
        if self.ellipsis() {
            return Ok(Shape::Any);
        }
        match self.s.get(self.i).copied() {
            Some('{') => {
                self.i += 1;
                let mut fields = Vec::new();
                let mut open = false;
                loop {
                    self.ws();
                    if self.eat("}") {
                        return Ok(Shape::Obj(fields, open));
                    }
                    if self.ellipsis() {
                        open = true;
                    } else {
                        let key = self.string()?;
                        self.ws();
                        ensure!(self.eat(":"), "expected `:` after \"{key}\"");
                        fields.push((key, self.value()?));
                    }
                    self.ws();
                    if !self.eat(",") {
                        self.ws();
                        ensure!(self.eat("}"), "expected `,` or `}}`");
                        return Ok(Shape::Obj(fields, open));
                    }
                }
            }
            Some('[') => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.ws();
                    if self.eat("]") {
                        return Ok(Shape::Arr(items));
                    }
                    if !self.ellipsis() {
                        items.push(self.value()?);
                    }
                    self.ws();
                    if !self.eat(",") {
                        self.ws();
                        ensure!(self.eat("]"), "expected `,` or `]`");
                        return Ok(Shape::Arr(items));
                    }
                }
            }
            Some('"') => {
                self.string()?;
                Ok(Shape::Str)
            }
            Some('t') if self.eat("true") => Ok(Shape::Bool),
            Some('f') if self.eat("false") => Ok(Shape::Bool),
            Some('n') if self.eat("null") => Ok(Shape::Null),
            Some(c) if c == '-' || c.is_ascii_digit() => {
                while self
                    .s
                    .get(self.i)
                    .is_some_and(|c| c.is_ascii_digit() || "+-.eE".contains(*c))
                {
                    self.i += 1;
                }
                Ok(Shape::Num)
            }
            _ => bail!("expected a JSON value"),
        }
    }
}

/// Whether `v` has the shape the doc shows: every field shown (and no other, unless the doc
/// writes `…`), of the same JSON type; every element of an array like the elements shown, and
/// at least one when the doc shows one.
fn check_shape(shape: &Shape, v: &serde_json::Value, path: &str) -> Result<(), String> {
    use serde_json::Value;
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    let want = |w: &str| Err(format!("{path}: the doc shows {w}, got {} ({v})", kind(v)));
    match (shape, v) {
        (Shape::Any, _)
        | (Shape::Null, Value::Null)
        | (Shape::Bool, Value::Bool(_))
        | (Shape::Num, Value::Number(_))
        | (Shape::Str, Value::String(_)) => Ok(()),
        (Shape::Arr(items), Value::Array(got)) => {
            if !items.is_empty() && got.is_empty() {
                return Err(format!(
                    "{path}: the doc shows elements, got an empty array"
                ));
            }
            for (k, g) in got.iter().enumerate() {
                let s = &items[k.min(items.len().saturating_sub(1))..];
                if let Some(s) = s.first() {
                    check_shape(s, g, &format!("{path}[{k}]"))?;
                }
            }
            Ok(())
        }
        (Shape::Obj(fields, open), Value::Object(got)) => {
            for (k, s) in fields {
                match got.get(k) {
                    Some(g) => check_shape(s, g, &format!("{path}.{k}"))?,
                    None => return Err(format!("{path}: the doc shows field `{k}`, missing")),
                }
            }
            if !open {
                let extra: Vec<&String> = got
                    .keys()
                    .filter(|k| !fields.iter().any(|(f, _)| f == *k))
                    .collect();
                if !extra.is_empty() {
                    return Err(format!(
                        "{path}: fields the doc does not show (add them, or `…`): {extra:?}"
                    ));
                }
            }
            Ok(())
        }
        (Shape::Null, _) => want("null"),
        (Shape::Bool, _) => want("a boolean"),
        (Shape::Num, _) => want("a number"),
        (Shape::Str, _) => want("a string"),
        (Shape::Arr(_), _) => want("an array"),
        (Shape::Obj(..), _) => want("an object"),
    }
}

/// A piece of a text template: shown output matched loosely.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Lit(char),
    /// One or more whitespace characters (columns are aligned with runs of spaces).
    Ws,
    /// A run of letters and digits that has a digit in the doc: an id, a number, a time.
    Alnum,
    /// `…`, `...` or `<placeholder>`: one or more of anything.
    Any,
}

fn template(line: &str) -> Vec<Tok> {
    let c: Vec<char> = line.trim().chars().collect();
    let mut out = Vec::new();
    let mut k = 0;
    while k < c.len() {
        if c[k].is_whitespace() {
            while k < c.len() && c[k].is_whitespace() {
                k += 1;
            }
            out.push(Tok::Ws);
        } else if c[k] == '…' {
            out.push(Tok::Any);
            k += 1;
        } else if c[k..].starts_with(&['.', '.', '.']) {
            out.push(Tok::Any);
            k += 3;
        } else if c[k] == '<'
            && c[k + 1..]
                .iter()
                .position(|&x| x == '>')
                .is_some_and(|p| p > 0)
        {
            let p = c[k + 1..].iter().position(|&x| x == '>').unwrap_or(0);
            out.push(Tok::Any);
            k += p + 2;
        } else if c[k].is_ascii_alphanumeric() {
            let end = c[k..]
                .iter()
                .position(|x| !x.is_ascii_alphanumeric())
                .map_or(c.len(), |p| k + p);
            if c[k..end].iter().any(char::is_ascii_digit) {
                out.push(Tok::Alnum);
            } else {
                out.extend(c[k..end].iter().map(|&x| Tok::Lit(x)));
            }
            k = end;
        } else {
            out.push(Tok::Lit(c[k]));
            k += 1;
        }
    }
    out
}

fn template_matches(toks: &[Tok], line: &str) -> bool {
    let a: Vec<char> = line.trim().chars().collect();
    // ok[t][i]: toks[t..] matches a[i..].
    let mut ok = vec![vec![false; a.len() + 1]; toks.len() + 1];
    ok[toks.len()][a.len()] = true;
    for t in (0..toks.len()).rev() {
        for i in (0..a.len()).rev() {
            let one_or_more = |fits: bool| fits && (ok[t + 1][i + 1] || ok[t][i + 1]);
            ok[t][i] = match toks[t] {
                Tok::Lit(c) => a[i] == c && ok[t + 1][i + 1],
                Tok::Ws => one_or_more(a[i].is_whitespace()),
                Tok::Alnum => one_or_more(a[i].is_ascii_alphanumeric()),
                Tok::Any => one_or_more(true),
            };
        }
    }
    ok[0][0]
}

/// Output a doc shows, and where.
#[derive(Debug, Clone)]
enum Shown {
    Json(Shape, String),
    Int(i64),
    /// A table: its header's columns and how many rows the doc shows.
    Table(Vec<String>, usize),
    /// Lines to find, one after another, in the output (stdout, then stderr).
    Text(Vec<String>),
}

#[derive(Debug, Clone)]
struct Expect {
    /// 1-based line in the markdown file.
    line: usize,
    shown: Shown,
}

fn is_table_header(t: &str) -> bool {
    let w: Vec<&str> = t.split_whitespace().collect();
    w.len() >= 2
        && t.contains("  ")
        && w.iter().all(|w| {
            w.starts_with(|c: char| c.is_ascii_uppercase())
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || "_/".contains(c))
        })
}

fn leading_int(t: &str) -> Option<i64> {
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let rest = &t[end..];
    if end > 0 && (rest.is_empty() || rest.starts_with(':') || rest.starts_with(' ')) {
        t[..end].parse().ok()
    } else {
        None
    }
}

/// Drops a trailing note such as `      (on stderr)` from a shown line.
fn strip_note(t: &str) -> &str {
    match t.rfind("  (") {
        Some(p) if t.ends_with(')') => t[..p].trim_end(),
        _ => t,
    }
}

/// What a command's comments show: a trailing `# {json}` or `# 401`, or the comment lines
/// under it. A trailing comment in words is prose.
fn expectations(cmd: &Cmd) -> Result<Vec<Expect>> {
    let mut out = Vec::new();
    if let Some(t) = &cmd.trailing {
        let shown = if t.starts_with('{') || t.starts_with('[') {
            Some(Shown::Json(ShapeParser::parse(t)?, t.clone()))
        } else if let Some(n) = leading_int(t) {
            Some(Shown::Int(n))
        } else if is_table_header(t) {
            Some(Shown::Table(
                t.split_whitespace().map(str::to_string).collect(),
                0,
            ))
        } else {
            None
        };
        if let Some(shown) = shown {
            out.push(Expect {
                line: cmd.line,
                shown,
            });
        }
    }
    if let Some(first) = cmd.comments.first() {
        let line = cmd.line + cmd.code.trim_end().lines().count();
        let shown = if first.starts_with('{') || first.starts_with('[') {
            ensure!(
                cmd.comments.len() == 1,
                "line {line}: JSON output is shown on one comment line"
            );
            Shown::Json(ShapeParser::parse(first)?, first.clone())
        } else if let (Some(n), 1) = (leading_int(first), cmd.comments.len()) {
            Shown::Int(n)
        } else if is_table_header(first) {
            Shown::Table(
                first.split_whitespace().map(str::to_string).collect(),
                cmd.comments.len() - 1,
            )
        } else {
            Shown::Text(
                cmd.comments
                    .iter()
                    .map(|c| strip_note(c).to_string())
                    .collect(),
            )
        };
        out.push(Expect { line, shown });
    }
    Ok(out)
}

/// Checks a command's output against what the doc shows.
fn check_output(e: &Expect, stdout: &str, stderr: &str) -> Result<(), String> {
    match &e.shown {
        Shown::Json(shape, text) => {
            let v: serde_json::Value = serde_json::from_str(stdout.trim()).map_err(|err| {
                format!("the doc shows JSON `{text}`, the output is not JSON ({err})")
            })?;
            check_shape(shape, &v, "$").map_err(|m| format!("{m}\n  the doc shows: {text}"))
        }
        Shown::Int(n) => {
            if stdout.trim() == n.to_string() {
                Ok(())
            } else {
                Err(format!(
                    "the doc shows `{n}`, the output is `{}`",
                    stdout.trim()
                ))
            }
        }
        Shown::Table(header, rows) => {
            let mut lines = stdout.lines().filter(|l| !l.trim().is_empty());
            let got: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
            if got != *header {
                return Err(format!(
                    "the doc shows the columns {}, the output has {}",
                    header.join(" "),
                    got.join(" ")
                ));
            }
            if *rows > 0 && lines.next().is_none() {
                return Err("the doc shows rows, the table has none".to_string());
            }
            Ok(())
        }
        Shown::Text(want) => {
            let got: Vec<&str> = stdout.lines().chain(stderr.lines()).collect();
            let toks: Vec<Vec<Tok>> = want.iter().map(|w| template(w)).collect();
            let fits = (0..got.len().max(1)).any(|start| {
                toks.iter()
                    .enumerate()
                    .all(|(k, t)| got.get(start + k).is_some_and(|g| template_matches(t, g)))
            });
            if fits {
                Ok(())
            } else {
                Err(format!(
                    "the doc shows\n    {}\n  (ids, numbers and placeholders loose), the output is\n    {}",
                    want.join("\n    "),
                    got.join("\n    ")
                ))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A doc as blocks to run
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum BlockKind {
    Run(Vec<Cmd>),
    Illustrative,
    Skipped(String),
}

#[derive(Debug)]
struct Block {
    line: usize,
    kind: BlockKind,
    /// Needs the GPU backend (`--features gpu`, `--backend wgpu`).
    gpu: bool,
    /// A `text` block right under it: the output of its last command.
    text_output: Option<Expect>,
}

const SHELLS: [&str; 3] = ["sh", "bash", "shell"];

/// Reads a doc's shell blocks and checks the marking rules.
fn parse_doc(md: &str) -> Result<Vec<Block>> {
    let fs = fences(md)?;
    let mut blocks: Vec<Block> = Vec::new();
    for (k, f) in fs.iter().enumerate() {
        if f.lang == "text" && f.follows_fence && k > 0 && SHELLS.contains(&fs[k - 1].lang.as_str())
        {
            if let Some(b) = blocks.last_mut() {
                if b.line == fs[k - 1].line {
                    b.text_output = Some(Expect {
                        line: f.line,
                        shown: Shown::Text(f.body.clone()),
                    });
                }
            }
        }
        if !SHELLS.contains(&f.lang.as_str()) {
            continue;
        }
        let ctx = |m: String| anyhow::anyhow!("line {}: {m}", f.line);
        for t in &f.tags {
            ensure!(
                t == "illustrative",
                ctx(format!("unknown tag `{t}` (the one tag is `illustrative`)"))
            );
        }
        let raw = f.body.join("\n");
        let gpu = raw.contains("--features gpu") || raw.contains("--backend wgpu");
        let kind = if f.tags.iter().any(|t| t == "illustrative") {
            ensure!(
                f.prose.to_lowercase().contains("illustrative"),
                ctx(
                    "an `illustrative` block needs the word \"illustrative\" in the text \
                     just above it, so that the reader knows too"
                        .into()
                )
            );
            BlockKind::Illustrative
        } else {
            let cmds = split_commands(&f.body, f.line + 1)?;
            ensure!(!cmds.is_empty(), ctx("an empty shell block".into()));
            let reasons: Vec<Option<&str>> = cmds.iter().map(|c| skip_reason(&c.words())).collect();
            if reasons.iter().all(Option::is_some) {
                let mut r: Vec<&str> = reasons.into_iter().flatten().collect();
                r.dedup();
                BlockKind::Skipped(r.join("; "))
            } else {
                if let Some(c) = cmds.iter().zip(&reasons).find(|(_, r)| r.is_some()) {
                    bail!(ctx(format!(
                        "`{}` is not run ({}) but the block's other commands are: put it in a \
                         block of its own",
                        c.0.head(),
                        c.1.unwrap_or_default()
                    )));
                }
                let cmds: Vec<Cmd> = cmds
                    .into_iter()
                    .map(|c| Cmd {
                        code: rewrite_cargo_run(&c.code),
                        ..c
                    })
                    .collect();
                for c in &cmds {
                    ensure!(
                        !c.words().contains(&"cargo"),
                        ctx(format!(
                            "line {}: `{}` runs cargo: the test does not build; mark it \
                             illustrative or use `cargo run --release -p skein -- ...`",
                            c.line,
                            c.head()
                        ))
                    );
                    expectations(c).map_err(|e| ctx(format!("{e:#}")))?;
                }
                BlockKind::Run(cmds)
            }
        };
        blocks.push(Block {
            line: f.line,
            kind,
            gpu,
            text_output: None,
        });
    }
    Ok(blocks)
}

// ---------------------------------------------------------------------------------------------
// Running: sandbox, network namespace, servers
// ---------------------------------------------------------------------------------------------

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Whether the GPU blocks can run here: a Vulkan driver is installed (lavapipe counts), or
/// `SKEIN_EXPECT_GPU` says there must be one (then a missing adapter fails the block).
fn gpu_available() -> Result<(), String> {
    if std::env::var_os("SKEIN_EXPECT_GPU").is_some() {
        return Ok(());
    }
    let chosen = ["VK_ICD_FILENAMES", "VK_DRIVER_FILES"]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
    let icd = chosen
        || ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .filter_map(|e| e.ok())
            .any(|e| e.path().extension().is_some_and(|x| x == "json"));
    if icd {
        Ok(())
    } else {
        Err(
            "no Vulkan driver (no ICD in /usr/share/vulkan/icd.d); install \
             mesa-vulkan-drivers libvulkan1 for lavapipe"
                .to_string(),
        )
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A network namespace with only loopback up; removed on drop.
struct NetNs(String);

impl NetNs {
    fn create(index: usize) -> Result<NetNs> {
        let name = format!("skein-docs-{}-{index}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = NetNs(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn signal_group(pgid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args(["-s", sig, "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// At most the last `n` lines of `s`, indented.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let skip = lines.len().saturating_sub(n);
    let mut out = String::new();
    if skip > 0 {
        let _ = writeln!(out, "    ... ({skip} lines)");
    }
    for l in &lines[skip..] {
        let _ = writeln!(out, "    {l}");
    }
    out
}

/// A server started from a doc (or for it), in its own process group.
struct Server {
    kind: ServerKind,
    /// `README.md:81`
    at: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Server {
    fn logs(&self) -> String {
        format!(
            "  stdout:\n{}  stderr:\n{}",
            tail(&read(&self.stdout), 40),
            tail(&read(&self.stderr), 40)
        )
    }

    /// Ctrl-C, then wait for a clean exit ("Ctrl-C stops everything").
    fn stop(mut self) -> Result<()> {
        let pgid = self.child.id();
        if self.child.try_wait()?.is_none() {
            signal_group(pgid, "INT");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                signal_group(pgid, "KILL");
                ensure!(
                    status.success(),
                    "{} ({:?}) exited with {status} after Ctrl-C\n{}",
                    self.at,
                    self.kind,
                    self.logs()
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                signal_group(pgid, "KILL");
                let _ = self.child.wait();
                bail!(
                    "{} ({:?}) did not stop within {STOP_TIMEOUT:?} of Ctrl-C\n{}",
                    self.at,
                    self.kind,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal_group(self.child.id(), "KILL");
            let _ = self.child.wait();
        }
    }
}

/// One doc's private world: `HOME`, a scratch working directory, `skein` on `PATH`, a network
/// namespace, the shell state carried between blocks, and the servers running.
struct Sandbox {
    // Dropped in this order: the servers (killed), then the namespace, then the files.
    servers: Vec<Server>,
    ns: NetNs,
    dir: tempfile::TempDir,
    home: PathBuf,
    work: PathBuf,
    bin: PathBuf,
    state: PathBuf,
    seq: usize,
    log: String,
}

impl Sandbox {
    fn new(index: usize) -> Result<Sandbox> {
        let dir = tempfile::Builder::new().prefix("skein-docs-").tempdir()?;
        let home = dir.path().join("home");
        let work = dir.path().join("work");
        let bin = dir.path().join("bin");
        for d in [
            &home,
            &work,
            &bin,
            &dir.path().join("tmp"),
            &dir.path().join("out"),
        ] {
            std::fs::create_dir_all(d)?;
        }
        let run = home.join(".run");
        std::fs::create_dir_all(&run)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))?;
        // The binaries cargo built: `skein` for this test, `skein-node` (another package of the
        // workspace) next to it.
        let skein = PathBuf::from(env!("CARGO_BIN_EXE_skein"));
        let node = skein.with_file_name("skein-node");
        ensure!(
            node.is_file(),
            "{} is missing: the docs run `skein-node`, and cargo test links only the binaries \
             of the package under test; build every binary with the tests' features first: \
             `cargo build --workspace --all-targets --locked` (as .ci/run does)",
            node.display()
        );
        std::os::unix::fs::symlink(&skein, bin.join("skein"))?;
        std::os::unix::fs::symlink(&node, bin.join("skein-node"))?;
        // The repository root as the docs' working directory, but writes stay here.
        let root = repo_root();
        for e in std::fs::read_dir(&root)? {
            let e = e?;
            let name = e.file_name();
            if name == "target" || name == ".git" {
                continue;
            }
            std::os::unix::fs::symlink(e.path(), work.join(&name))?;
        }
        let state = dir.path().join("state.sh");
        std::fs::write(&state, "")?;
        Ok(Sandbox {
            ns: NetNs::create(index)?,
            dir,
            home,
            work,
            bin,
            state,
            seq: 0,
            servers: Vec::new(),
            log: String::new(),
        })
    }

    /// `bash FILE` in the namespace, in the scratch directory, with a reader's environment.
    fn bash(&self, script: &Path, stdout: &Path, stderr: &Path) -> Result<Child> {
        use std::os::unix::process::CommandExt;
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
        );
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns.0, "bash"])
            .arg(script)
            .current_dir(&self.work)
            .env_clear()
            .env("PATH", path)
            .env("HOME", &self.home)
            .env("USER", "root")
            .env("LANG", "C.UTF-8")
            .env("TERM", "dumb")
            .env("TMPDIR", self.dir.path().join("tmp"))
            .env("XDG_RUNTIME_DIR", self.home.join(".run"))
            .env("RUST_BACKTRACE", "1");
        // What finds tools and drivers on this host, not settings of Skein.
        for k in [
            "PYENV_ROOT",
            "LD_LIBRARY_PATH",
            "VK_ICD_FILENAMES",
            "VK_DRIVER_FILES",
        ] {
            if let Some(v) = std::env::var_os(k) {
                c.env(k, v);
            }
        }
        c.stdin(Stdio::null())
            .stdout(std::fs::File::create(stdout)?)
            .stderr(std::fs::File::create(stderr)?)
            .process_group(0);
        c.spawn()
            .context("starting bash in the namespace (`ip netns exec`)")
    }

    fn next(&mut self) -> (PathBuf, PathBuf, PathBuf) {
        self.seq += 1;
        let out = self.dir.path().join("out");
        (
            out.join(format!("{}.sh", self.seq)),
            out.join(format!("{}.out", self.seq)),
            out.join(format!("{}.err", self.seq)),
        )
    }

    /// Stops every running server, last started first.
    fn stop_servers(&mut self) -> Result<()> {
        let mut first_err = None;
        while let Some(s) = self.servers.pop() {
            let _ = writeln!(self.log, "  (Ctrl-C to {})", s.at);
            if let Err(e) = s.stop() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Starts a server and waits for its ready line.
    fn start_server(&mut self, at: &str, kind: ServerKind, code: &str) -> Result<()> {
        if kind.takes_mesh_ports() && !self.servers.is_empty() {
            self.stop_servers()
                .with_context(|| format!("stopping the mesh before {at}"))?;
        }
        let (script, stdout, stderr) = self.next();
        std::fs::write(
            &script,
            format!(
                "set -euo pipefail\nsource '{}'\n{}\n",
                self.state.display(),
                code.trim_end().trim_end_matches('&')
            ),
        )?;
        let _ = writeln!(self.log, "$ {} &   # {at}, in the background", code.trim());
        let child = self.bash(&script, &stdout, &stderr)?;
        let mut server = Server {
            kind,
            at: at.to_string(),
            child,
            stdout,
            stderr,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let out = read(&server.stdout) + &read(&server.stderr);
            if out.contains(kind.ready_line()) {
                let _ = write!(self.log, "{}", tail(&read(&server.stdout), 30));
                self.servers.push(server);
                return Ok(());
            }
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "{at}: `{}` exited ({status}) before it was ready\n{}",
                    code.trim(),
                    server.logs()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{at}: `{}` did not print `{}` within {READY_TIMEOUT:?}\n{}",
                    code.trim(),
                    kind.ready_line(),
                    server.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs commands in one bash, each with its output in files of its own; returns
    /// (stdout, stderr) of each. Variables carry over to the next script through `state`.
    fn run_script(&mut self, file: &str, cmds: &[&Cmd]) -> Result<Vec<(String, String)>> {
        let (script, stdout, stderr) = self.next();
        let out = self.dir.path().join("out");
        let first = self.seq * 1000;
        let mut s = String::new();
        let state = self.state.display().to_string();
        // Variables that exist before the block's own: the environment and bash's.
        let _ = writeln!(s, "set -euo pipefail");
        let _ = writeln!(s, "__doctest_base=\" $(compgen -v | tr '\\n' ' ') \"");
        let _ = writeln!(
            s,
            "__doctest_save() {{\n  local __v\n  for __v in $(compgen -v); do\n    \
             case \"$__doctest_base\" in *\" $__v \"*) continue;; esac\n    \
             case \"$__v\" in __*|_|BASH*|PIPESTATUS|FUNCNAME|OPTARG|OPTIND|REPLY) continue;; esac\n    \
             declare -p \"$__v\"\n  done > '{state}.new'\n  mv '{state}.new' '{state}'\n}}"
        );
        let _ = writeln!(s, "source '{state}'");
        for (k, c) in cmds.iter().enumerate() {
            let n = first + k;
            let _ = writeln!(s, "# {file}:{}", c.line);
            let _ = writeln!(s, "echo {n} > '{}/current'", out.display());
            let _ = writeln!(
                s,
                "{{\n{}\n}} > '{}/{n}.stdout' 2> '{}/{n}.stderr'",
                c.code.trim_end(),
                out.display(),
                out.display()
            );
        }
        let _ = writeln!(s, "__doctest_save");
        std::fs::write(&script, s)?;
        let mut child = self.bash(&script, &stdout, &stderr)?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            if Instant::now() > deadline {
                signal_group(child.id(), "KILL");
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let outputs: Vec<(String, String)> = (0..cmds.len())
            .map(|k| {
                let n = first + k;
                (
                    read(&out.join(format!("{n}.stdout"))),
                    read(&out.join(format!("{n}.stderr"))),
                )
            })
            .collect();
        let current: Option<usize> = read(&out.join("current")).trim().parse().ok();
        let ran = current
            .and_then(|c| (c + 1).checked_sub(first))
            .unwrap_or(0)
            .min(cmds.len());
        for (c, (o, e)) in cmds.iter().zip(&outputs).take(ran) {
            let _ = writeln!(self.log, "$ {}   # {file}:{}", c.code.trim(), c.line);
            let _ = write!(self.log, "{}", tail(o, 25));
            if !e.trim().is_empty() {
                let _ = write!(self.log, "  stderr:\n{}", tail(e, 15));
            }
        }
        let failed = match status {
            Some(st) if st.success() => return Ok(outputs),
            Some(st) => format!("failed ({st})"),
            None => format!("did not finish within {STEP_TIMEOUT:?}"),
        };
        let at = cmds.get(ran.saturating_sub(1)).unwrap_or(&cmds[0]);
        let (o, e) = outputs
            .get(ran.saturating_sub(1))
            .cloned()
            .unwrap_or_default();
        bail!(
            "{file}:{}: `{}` {failed}\n  stdout:\n{}  stderr:\n{}  bash:\n{}",
            at.line,
            at.head(),
            tail(&o, 30),
            tail(&e, 30),
            tail(&read(&stderr), 10)
        )
    }
}

/// Runs one doc's blocks in order; returns its transcript, and the first failure.
fn run_doc(file: &str, index: usize) -> (String, Result<()>) {
    let mut log = String::new();
    let r = (|| -> Result<()> {
        let md = std::fs::read_to_string(repo_root().join(file))?;
        let blocks = parse_doc(&md).with_context(|| file.to_string())?;
        let gpu = gpu_available();
        let runnable = |b: &Block| matches!(b.kind, BlockKind::Run(_)) && (!b.gpu || gpu.is_ok());
        if !blocks.iter().any(runnable) {
            let _ = writeln!(log, "{file}: no command to run");
            return Ok(());
        }
        let mut sb = Sandbox::new(index)?;
        let result = run_blocks(file, &blocks, &gpu, &mut sb);
        let stopped = sb.stop_servers();
        log.push_str(&sb.log);
        result?;
        stopped
    })();
    (log, r)
}

fn run_blocks(
    file: &str,
    blocks: &[Block],
    gpu: &Result<(), String>,
    sb: &mut Sandbox,
) -> Result<()> {
    let mut mesh_started = false;
    // Output that differs from what the doc shows leaves the mesh as it was: go on, and report
    // every difference at the end. A failing command stops the doc.
    let mut failures = Vec::new();
    for b in blocks {
        let cmds = match &b.kind {
            BlockKind::Run(cmds) => cmds,
            BlockKind::Illustrative => {
                let _ = writeln!(sb.log, "# {file}:{}: illustrative, not run", b.line);
                continue;
            }
            BlockKind::Skipped(why) => {
                let _ = writeln!(sb.log, "# {file}:{}: not run: {why}", b.line);
                continue;
            }
        };
        if let (true, Err(why)) = (b.gpu, gpu) {
            let _ = writeln!(sb.log, "# {file}:{}: GPU block skipped: {why}", b.line);
            println!("skipped: {file}:{}: a GPU block: {why}", b.line);
            continue;
        }
        // Servers start in the background; the commands between them run in one bash.
        let mut pending: Vec<&Cmd> = Vec::new();
        let mut outputs: Vec<(String, String)> = Vec::new();
        let mut last_server: Option<(PathBuf, PathBuf)> = None;
        for c in cmds {
            let words = c.words();
            let background = c.code.trim_end().ends_with('&') && !c.code.trim_end().ends_with("&&");
            match ServerKind::of(&words) {
                Some(kind) => {
                    flush(file, sb, &mut pending, &mut outputs)?;
                    if !mesh_started && !kind.takes_mesh_ports() {
                        start_presupposed_up(file, sb)?;
                    }
                    mesh_started = true;
                    sb.start_server(&format!("{file}:{}", c.line), kind, &c.code)?;
                    let s = sb
                        .servers
                        .last()
                        .map(|s| (s.stdout.clone(), s.stderr.clone()));
                    last_server = s;
                    outputs.push((String::new(), String::new()));
                }
                None => {
                    ensure!(
                        !background,
                        "{file}:{}: `{}` runs in the background, and the test knows only \
                         `skein up`, `skein coordinator` and `skein-node` as servers",
                        c.line,
                        c.head()
                    );
                    if !mesh_started {
                        start_presupposed_up(file, sb)?;
                        mesh_started = true;
                    }
                    last_server = None;
                    pending.push(c);
                }
            }
        }
        flush(file, sb, &mut pending, &mut outputs)?;
        // What the doc shows.
        for (c, (o, e)) in cmds.iter().zip(&outputs) {
            for x in expectations(c)? {
                if let Err(m) = check_output(&x, o, e) {
                    failures.push(format!("{file}:{}: `{}`: {m}", x.line, c.head()));
                }
            }
            // A plain `skein ... --output json` (no pipe, redirection or substitution).
            let words = c.words();
            let plain = !c.code.contains(['|', '>', '$', '<']);
            if plain
                && program(&words).0 == Some("skein")
                && words.windows(2).any(|w| w == ["--output", "json"])
                && ServerKind::of(&words).is_none()
            {
                if let Err(err) = serde_json::from_str::<serde_json::Value>(o.trim()) {
                    failures.push(format!(
                        "{file}:{}: `{}` prints no JSON ({err}):\n{}",
                        c.line,
                        c.head(),
                        tail(o, 10)
                    ));
                }
            }
        }
        if let (Some(x), Some(c)) = (&b.text_output, cmds.last()) {
            let (o, e) = match &last_server {
                Some((so, se)) => (read(so), read(se)),
                None => outputs.last().cloned().unwrap_or_default(),
            };
            if let Err(m) = check_output(x, &o, &e) {
                failures.push(format!(
                    "{file}:{}: the output shown for `{}`: {m}",
                    x.line,
                    c.head()
                ));
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Runs the commands gathered since the last server in one bash, and keeps their outputs.
fn flush(
    file: &str,
    sb: &mut Sandbox,
    pending: &mut Vec<&Cmd>,
    outputs: &mut Vec<(String, String)>,
) -> Result<()> {
    if !pending.is_empty() {
        outputs.extend(sb.run_script(file, pending)?);
        pending.clear();
    }
    Ok(())
}

/// A doc that does not start a mesh itself presupposes `skein up` (its examples use the
/// key `up` writes and its ports).
fn start_presupposed_up(file: &str, sb: &mut Sandbox) -> Result<()> {
    let _ = writeln!(
        sb.log,
        "# {file} presupposes a running `skein up`: starting one"
    );
    sb.start_server(&format!("{file} (presupposed)"), ServerKind::Up, "skein up")
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// Every doc parses under the convention: blocks close, commands end, illustrative blocks say
/// so in the text, skipped commands are not mixed with run ones, shown JSON parses. Needs
/// neither root nor a build of anything but this test.
#[test]
fn docs_follow_the_convention() {
    let mut errors = Vec::new();
    let mut runs = 0;
    for file in doc_files().expect("listing the docs") {
        let md = std::fs::read_to_string(repo_root().join(&file)).expect("reading a doc");
        match parse_doc(&md) {
            Ok(blocks) => {
                runs += blocks
                    .iter()
                    .filter(|b| matches!(b.kind, BlockKind::Run(_)))
                    .count();
            }
            Err(e) => errors.push(format!("{file}: {e:#}")),
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    if std::env::var_os("SKEIN_DOCS").is_none() {
        assert!(
            runs >= 10,
            "only {runs} runnable shell blocks found in the docs"
        );
    }
}

/// Every runnable shell block of every doc, in order, against a fresh mesh per doc.
#[test]
fn docs_run_as_written() {
    if !is_root()
        || Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map_or(true, |o| !o.status.success())
    {
        assert!(
            std::env::var_os("SKEIN_EXPECT_ROOT").is_none(),
            "SKEIN_EXPECT_ROOT is set but network namespaces are not available here (root and \
             `ip netns` needed)"
        );
        println!("skipping: the docs run in a network namespace of their own: root and `ip netns` needed");
        return;
    }
    let files = doc_files().expect("listing the docs");
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL_DOCS {
            s.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(file) = files.get(k) else { break };
                let started = Instant::now();
                let (log, r) = run_doc(file, k);
                let took = started.elapsed();
                results.lock().unwrap_or_else(|e| e.into_inner()).push((
                    k,
                    file.clone(),
                    log,
                    r,
                    took,
                ));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|r| r.0);
    let mut failures = Vec::new();
    for (_, file, log, r, took) in &results {
        println!("==== {file} ({:.1} s)\n{log}", took.as_secs_f64());
        if let Err(e) = r {
            failures.push(format!("{file}: {e:#}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------------------------------------
// The pieces, on their own
// ---------------------------------------------------------------------------------------------

fn lines(s: &str) -> Vec<String> {
    s.lines().map(str::to_string).collect()
}

#[test]
fn commands_split_on_quotes_substitutions_continuations_and_heredocs() {
    let body = lines(concat!(
        "# prose at the start\n",
        "KEY=$(cat ~/key)\n",
        "curl -s localhost:8080/v2/health/ready   # {\"ready\":true}\n",
        "curl -s -d \"{\\\"a\\\": [$(python3 -c 'print(\",\".join([\"0\"]*3))')]}\" \\\n",
        "  localhost:8080/x\n",
        "# 401\n",
        "\n",
        "# prose after a blank line\n",
        "cat > p.toml <<EOF\n",
        "a = \"$(cat k)\" # not a comment in a heredoc\n",
        "EOF\n",
        "echo \"multi\n",
        "line # still in quotes\"\n",
        "x=$(( ($(date +%s) - 86400) * 1000 ))\n",
    ));
    let c = split_commands(&body, 10).expect("splits");
    assert_eq!(c.len(), 6, "{c:#?}");
    assert_eq!(c[0].line, 11);
    assert_eq!(c[0].code.trim(), "KEY=$(cat ~/key)");
    assert!(c[0].comments.is_empty());
    assert_eq!(c[1].trailing.as_deref(), Some("{\"ready\":true}"));
    assert_eq!(c[2].line, 13);
    assert_eq!(c[2].code.lines().count(), 2);
    assert_eq!(c[2].comments, vec!["401".to_string()]);
    assert!(c[3].code.contains("not a comment in a heredoc\nEOF"));
    assert!(
        c[3].comments.is_empty(),
        "prose after a blank line is not output"
    );
    assert!(c[4].code.contains("# still in quotes"));
    assert_eq!(c[5].line, 23);
    assert!(split_commands(&lines("echo 'open"), 1).is_err());
    assert!(split_commands(&lines("cat <<EOF\nno end"), 1).is_err());
}

#[test]
fn cargo_run_becomes_skein() {
    assert_eq!(
        rewrite_cargo_run("cargo run --release -p skein -- up\n"),
        "skein up\n"
    );
    assert_eq!(
        rewrite_cargo_run("cargo run --release -p skein --features gpu -- up --backend wgpu"),
        "skein up --backend wgpu"
    );
    assert_eq!(
        rewrite_cargo_run("cargo build --release -p skein"),
        "cargo build --release -p skein"
    );
}

#[test]
fn servers_and_skipped_commands_are_recognised() {
    let w = |s: &'static str| s.split_whitespace().collect::<Vec<_>>();
    assert_eq!(
        ServerKind::of(&w("skein up --backend wgpu")),
        Some(ServerKind::Up)
    );
    assert_eq!(
        ServerKind::of(&w("skein --profile p coordinator --listen 127.0.0.1:7070")),
        Some(ServerKind::Coordinator)
    );
    assert_eq!(
        ServerKind::of(&w("A=b skein-node --coordinator x")),
        Some(ServerKind::Node)
    );
    assert_eq!(ServerKind::of(&w("skein-node --help")), None);
    assert_eq!(ServerKind::of(&w("skein --profile up models")), None);
    assert_eq!(ServerKind::of(&w("skein models")), None);
    assert!(skip_reason(&w("./scripts/test")).is_some());
    assert!(skip_reason(&w("cargo build --release -p skein")).is_some());
    assert!(skip_reason(&w("time target/release/skein-sim --nodes 1")).is_some());
    assert!(skip_reason(&w("SKEIN_RAY_VENV=/x scripts/bench-side-by-side")).is_some());
    assert!(skip_reason(&w("cargo run --release -p skein -- up")).is_none());
    assert!(skip_reason(&w("skein models")).is_none());
}

#[test]
fn illustrative_blocks_must_say_so_visibly() {
    let ok = "Illustrative: on another host.\n\n```sh illustrative\nskein-node --x ...\n```\n";
    let b = parse_doc(ok).expect("parses");
    assert!(matches!(b[0].kind, BlockKind::Illustrative));
    let hidden = "On another host.\n\n```sh illustrative\nskein-node --x ...\n```\n";
    assert!(parse_doc(hidden).is_err());
    let typo = "Illustrative.\n```sh ilustrative\nls\n```\n";
    assert!(parse_doc(typo).is_err());
    let mixed = "```sh\ncargo build -p skein\nskein models\n```\n";
    assert!(parse_doc(mixed).is_err());
    let skipped = "```sh\n./scripts/test\n```\n";
    assert!(matches!(
        parse_doc(skipped).expect("parses")[0].kind,
        BlockKind::Skipped(_)
    ));
    let out = "```sh\nskein infer m\n```\n\n```text\nm version 1\n```\n";
    let b = parse_doc(out).expect("parses");
    assert!(b[0].text_output.is_some());
}

#[test]
fn shown_json_is_checked_by_fields_and_types() {
    let check = |doc: &str, got: &str| {
        let shape = ShapeParser::parse(doc).expect("the doc's JSON parses");
        check_shape(&shape, &serde_json::from_str(got).expect("JSON"), "$")
    };
    assert!(check(r#"{"ready":true}"#, r#"{"ready": false}"#).is_ok());
    assert!(check(r#"{"ready":true}"#, r#"{"ready": 1}"#).is_err());
    assert!(check(r#"{"ready":true}"#, r#"{"ready": true, "live": true}"#).is_err());
    assert!(check(
        r#"{"id":"…","key":"skn_…"}   the key is shown only here"#,
        r#"{"id":"a","key":"b"}"#
    )
    .is_ok());
    assert!(check(
        r#"[{"tenant":"acme","requests":3,…,"cost":0.0}]"#,
        r#"[{"tenant":"t","requests":1,"cost":0,"x":null}]"#
    )
    .is_ok());
    assert!(check(r#"[{"tenant":"acme"}]"#, "[]").is_err());
    assert!(check(r#"{"created_ms":…}"#, r#"{"created_ms":null}"#).is_ok());
    assert!(check(r#"{"a":{"b":[1]}}"#, r#"{"a":{"b":["x"]}}"#).is_err());
}

#[test]
fn shown_text_matches_ids_numbers_and_placeholders_loosely() {
    let m = |doc: &str, got: &str| template_matches(&template(doc), got);
    assert!(m(
        "tenant root, key 7b7513fa2dcb, scopes admin",
        "tenant root, key 0f3a9c1b2d4e, scopes admin"
    ));
    assert!(!m(
        "tenant root, key 7b7513fa2dcb, scopes admin",
        "tenant acme, key 0f3a9c1b2d4e, scopes admin"
    ));
    assert!(m(
        "node <node id>  cold_start <true|false>  queue <n> µs",
        "node 9c1f0d3a  cold_start false  queue 14 µs"
    ));
    assert!(m("OUTPUT   DATATYPE  SHAPE", "OUTPUT DATATYPE SHAPE"));
    assert!(!m("OUTPUT   DATATYPE  SHAPE", "OUTPUT DATATYPE"));
    assert!(m(
        "revoked node 70c45c74...: disconnected",
        "revoked node 70c45c74deadbeef: disconnected"
    ));
    assert_eq!(
        strip_note("single use, valid until 2026-11-29T12:22:11Z      (on stderr)"),
        "single use, valid until 2026-11-29T12:22:11Z"
    );
    let e = Expect {
        line: 1,
        shown: Shown::Text(vec![
            "skein1-75f0c6-0f78".into(),
            "single use, valid until 2026-11-29T12:22:11Z".into(),
        ]),
    };
    assert!(check_output(
        &e,
        "skein1-aa11-bb22\n",
        "single use, valid until 2026-12-05T10:00:00Z\n"
    )
    .is_ok());
    assert!(check_output(&e, "skein1-aa11-bb22\n", "").is_err());
    let t = Expect {
        line: 1,
        shown: Shown::Table(vec!["TENANT".into(), "MAX_RPS".into()], 1),
    };
    assert!(check_output(&t, "TENANT  MAX_RPS\nacme    50\n", "").is_ok());
    assert!(check_output(&t, "TENANT  MAX_RPS\n", "").is_err());
    assert!(check_output(&t, "TENANT\nacme\n", "").is_err());
    let i = Expect {
        line: 1,
        shown: Shown::Int(401),
    };
    assert!(check_output(&i, "401\n", "").is_ok());
    assert!(check_output(&i, "200\n", "").is_err());
}
