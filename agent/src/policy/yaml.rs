//! A YAML document tree that keeps the source position of every node.
//!
//! Built from the event stream of `granit-parser` (the parser behind `serde-saphyr`), because
//! validation errors must point at the line of the offending value, which serde-style
//! deserialisation does not give for semantic errors.
use std::collections::HashMap;

use granit_parser::{Event, Parser, ScalarStyle, Span};

use super::error::Pos;

#[derive(Clone, Debug)]
pub(crate) enum Value {
    /// A scalar's text; `plain` is false for quoted and block scalars (they are always strings).
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    /// A plain `~`, `null` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, plain: true }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn type_name(&self) -> &'static str {
        match &self.value {
            _ if self.is_null() => "null",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a sequence",
            Value::Map(_) => "a mapping",
        }
    }
}

/// Why a text is not YAML: position and message.
#[derive(Debug)]
pub(crate) struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Upper bound on nodes per stream, so aliases cannot blow memory up ("billion laughs").
const MAX_NODES: usize = 1_000_000;

fn pos_of(span: &Span) -> Pos {
    Pos::new(span.start.line() as u32, span.start.col() as u32 + 1)
}

enum Frame {
    Seq(Vec<Node>, Pos, usize),
    /// Entries, a pending key, position, anchor id.
    Map(Vec<(Node, Node)>, Option<Node>, Pos, usize),
}

/// Parse every document of a stream. Empty documents (e.g. after a trailing `---`) are dropped.
pub(crate) fn parse_stream(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let mut docs = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut count = 0usize;
    for item in Parser::new_from_str(text) {
        let (event, span) = item.map_err(|e| SyntaxError {
            pos: Pos::new(e.marker().line() as u32, e.marker().col() as u32 + 1),
            message: e.info(),
        })?;
        let pos = pos_of(&span);
        let (node, anchor) = match event {
            Event::DocumentStart(..) => {
                anchors.clear();
                continue;
            }
            Event::Scalar(text, style, anchor, _tag) => (
                Node {
                    value: Value::Scalar {
                        text: text.into_owned(),
                        plain: style == ScalarStyle::Plain,
                    },
                    pos,
                },
                anchor,
            ),
            Event::Alias(id) => match anchors.get(&id) {
                Some(n) => {
                    count += count_nodes(n);
                    (n.clone(), 0)
                }
                None => {
                    return Err(SyntaxError {
                        pos,
                        message: "unknown alias".into(),
                    });
                }
            },
            Event::SequenceStart(_, anchor, _) => {
                stack.push(Frame::Seq(Vec::new(), pos, anchor));
                continue;
            }
            Event::MappingStart(_, anchor, _) => {
                stack.push(Frame::Map(Vec::new(), None, pos, anchor));
                continue;
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq(items, pos, anchor)) => (
                    Node {
                        value: Value::Seq(items),
                        pos,
                    },
                    anchor,
                ),
                _ => unreachable_frame(pos)?,
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map(entries, None, pos, anchor)) => (
                    Node {
                        value: Value::Map(entries),
                        pos,
                    },
                    anchor,
                ),
                _ => unreachable_frame(pos)?,
            },
            // Stream/document ends, comments and anchor metadata carry no data.
            _ => continue,
        };
        count += 1;
        if count > MAX_NODES {
            return Err(SyntaxError {
                pos,
                message: format!("document too large (more than {MAX_NODES} nodes)"),
            });
        }
        if anchor != 0 {
            anchors.insert(anchor, node.clone());
        }
        match stack.last_mut() {
            None => {
                if !node.is_null() {
                    docs.push(node);
                }
            }
            Some(Frame::Seq(items, ..)) => items.push(node),
            Some(Frame::Map(entries, pending, ..)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }
    Ok(docs)
}

fn count_nodes(n: &Node) -> usize {
    match &n.value {
        Value::Scalar { .. } => 1,
        Value::Seq(items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        Value::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| count_nodes(k) + count_nodes(v))
                .sum::<usize>()
        }
    }
}

fn unreachable_frame<T>(pos: Pos) -> Result<T, SyntaxError> {
    // The parser guarantees balanced events; report rather than panic if that ever breaks.
    Err(SyntaxError {
        pos,
        message: "unbalanced YAML events".into(),
    })
}
