//! Where things are in a playbook's text: line:column of every key and value, and `${...}`
//! interpolation.
//!
//! serde_yaml 0.9 parses into `Value`s that carry no position, so a small scanner walks the
//! block-style text and records the position of each mapping key and value by path
//! (`steps[2].expand.factor`). Flow collections (`{...}`, `[...]`) are not descended into: errors
//! inside them point at the collection, which is still the right line.

use std::collections::{BTreeMap, HashMap};

/// A 1-based line and column in the playbook file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Positions of keys and values by path.
#[derive(Debug, Default)]
pub struct Positions {
    keys: HashMap<String, Pos>,
    values: HashMap<String, Pos>,
}

impl Positions {
    /// Where the key at `path` is written, or its closest ancestor's.
    pub fn key(&self, path: &str) -> Pos {
        self.lookup(path, true)
    }

    /// Where the value at `path` starts, or its key's, or its closest ancestor's.
    pub fn value(&self, path: &str) -> Pos {
        self.lookup(path, false)
    }

    fn lookup(&self, path: &str, key_first: bool) -> Pos {
        let mut current = path;
        loop {
            let found = if key_first {
                self.keys.get(current).or_else(|| self.values.get(current))
            } else {
                self.values.get(current).or_else(|| self.keys.get(current))
            };
            if let Some(pos) = found {
                return *pos;
            }
            match parent(current) {
                Some(up) => current = up,
                None => return Pos { line: 1, column: 1 },
            }
        }
    }

    pub fn scan(text: &str) -> Positions {
        let mut scanner = Scanner {
            positions: Positions::default(),
            stack: Vec::new(),
            pending: Some(String::new()),
        };
        // Lines more indented than this belong to a block scalar (`|`, `>`).
        let mut block_owner: Option<usize> = None;
        // Open brackets of a flow collection that spans lines.
        let mut flow_depth: i64 = 0;
        for (number, raw) in text.lines().enumerate() {
            let content = strip_comment(raw);
            if content.trim().is_empty() {
                continue;
            }
            let indent = content.len() - content.trim_start_matches(' ').len();
            if let Some(owner) = block_owner {
                if indent > owner {
                    continue;
                }
                block_owner = None;
            }
            if flow_depth > 0 {
                flow_depth += bracket_balance(content);
                continue;
            }
            let trimmed = content.trim_end();
            if indent == 0 && (trimmed.starts_with("---") || trimmed == "...") {
                continue;
            }
            let effect = scanner.entry(number + 1, indent, &trimmed[indent..]);
            match effect {
                Effect::None => {}
                Effect::BlockScalar(owner) => block_owner = Some(owner),
                Effect::Flow(depth) => flow_depth = depth,
            }
        }
        // The scanner measures bytes; editors and serde_yaml count characters.
        let mut positions = scanner.positions;
        let lines: Vec<&str> = text.lines().collect();
        for pos in positions
            .keys
            .values_mut()
            .chain(positions.values.values_mut())
        {
            if let Some(line) = lines.get(pos.line.saturating_sub(1)) {
                pos.column = char_column(line, pos.column.saturating_sub(1));
            }
        }
        positions
    }
}

/// The 1-based column, in characters, of the byte offset `byte` of `line`.
pub fn char_column(line: &str, byte: usize) -> usize {
    line.char_indices().take_while(|(at, _)| *at < byte).count() + 1
}

/// The byte offset of the 1-based character column `column` of `line`.
pub fn byte_offset(line: &str, column: usize) -> usize {
    line.char_indices()
        .nth(column.saturating_sub(1))
        .map_or(line.len(), |(at, _)| at)
}

fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

struct Frame {
    indent: usize,
    path: String,
    seq: bool,
    next: usize,
}

enum Effect {
    None,
    BlockScalar(usize),
    Flow(i64),
}

struct Scanner {
    positions: Positions,
    stack: Vec<Frame>,
    /// The path a nested collection on the next lines belongs to (after `key:` or `-`).
    pending: Option<String>,
}

impl Scanner {
    /// One node starting at 0-based column `col` of `line`.
    fn entry(&mut self, line: usize, col: usize, text: &str) -> Effect {
        let is_item = text == "-" || text.starts_with("- ");
        while let Some(top) = self.stack.last() {
            // A sequence may sit at its key's indentation; a key at that indentation ends it.
            if top.indent > col || (top.indent == col && top.seq && !is_item) {
                self.stack.pop();
            } else {
                break;
            }
        }
        let opens = match self.stack.last() {
            None => true,
            Some(top) => top.indent < col || (top.indent == col && !top.seq && is_item),
        };
        if opens {
            // More indented without a pending key: a continued plain scalar.
            let Some(path) = self.pending.take() else {
                return Effect::None;
            };
            self.stack.push(Frame {
                indent: col,
                path,
                seq: is_item,
                next: 0,
            });
        } else {
            self.pending = None;
        }
        let Some(top) = self.stack.last_mut() else {
            return Effect::None;
        };
        if top.seq {
            if !is_item {
                return Effect::None;
            }
            let item = format!("{}[{}]", top.path, top.next);
            top.next += 1;
            let pos = Pos {
                line,
                column: col + 1,
            };
            self.positions.keys.insert(item.clone(), pos);
            let rest = text[1..].trim_start();
            let rest_col = col + (text.len() - rest.len());
            self.pending = Some(item.clone());
            if rest.is_empty() {
                return Effect::None;
            }
            self.positions.values.insert(
                item.clone(),
                Pos {
                    line,
                    column: rest_col + 1,
                },
            );
            if rest.starts_with('{') || rest.starts_with('[') {
                self.pending = None;
                return self.flow_or_span(line, rest_col, rest, &item);
            }
            return self.entry(line, rest_col, rest);
        }
        let path = top.path.clone();
        let Some((key, value_offset)) = split_key(text) else {
            return Effect::None;
        };
        let path = join(&path, &key);
        self.positions.keys.insert(
            path.clone(),
            Pos {
                line,
                column: col + 1,
            },
        );
        let value = text[value_offset..].trim_start();
        if value.is_empty() {
            self.pending = Some(path);
            return Effect::None;
        }
        let value_col = col + text.len() - value.len();
        self.positions.values.insert(
            path.clone(),
            Pos {
                line,
                column: value_col + 1,
            },
        );
        self.pending = None;
        if value.starts_with('|') || value.starts_with('>') {
            return Effect::BlockScalar(col);
        }
        if value.starts_with('{') || value.starts_with('[') {
            return self.flow_or_span(line, value_col, value, &path);
        }
        Effect::None
    }

    /// A flow collection: its entries get positions when it closes on this line; one that spans
    /// lines is skipped (errors inside point at the collection).
    fn flow_or_span(&mut self, line: usize, col: usize, text: &str, path: &str) -> Effect {
        let depth = bracket_balance(text);
        if depth > 0 {
            return Effect::Flow(depth);
        }
        self.flow(line, col, text, path);
        Effect::None
    }

    /// Records the entries of the single-line flow collection `text` starting at column `col`.
    fn flow(&mut self, line: usize, col: usize, text: &str, path: &str) {
        let is_map = text.starts_with('{');
        let mut depth = 0;
        let mut quote: Option<char> = None;
        let mut start = 1;
        let mut index = 0;
        for (at, c) in text.char_indices() {
            if let Some(open) = quote {
                if c == open {
                    quote = None;
                }
                continue;
            }
            match c {
                '"' | '\'' => quote = Some(c),
                '{' | '[' => depth += 1,
                '}' | ']' => {
                    depth -= 1;
                    if depth == 0 {
                        self.flow_entry(line, col, &text[start..at], start, path, is_map, index);
                        return;
                    }
                }
                ',' if depth == 1 => {
                    self.flow_entry(line, col, &text[start..at], start, path, is_map, index);
                    index += 1;
                    start = at + 1;
                }
                _ => {}
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // one flow entry: where it is and what it belongs to
    fn flow_entry(
        &mut self,
        line: usize,
        col: usize,
        part: &str,
        offset: usize,
        path: &str,
        is_map: bool,
        index: usize,
    ) {
        let trimmed = part.trim();
        if trimmed.is_empty() {
            return;
        }
        let part_col = col + offset + (part.len() - part.trim_start().len());
        let pos = Pos {
            line,
            column: part_col + 1,
        };
        if !is_map {
            let item = format!("{path}[{index}]");
            self.positions.keys.insert(item.clone(), pos);
            self.positions.values.insert(item.clone(), pos);
            if trimmed.starts_with('{') || trimmed.starts_with('[') {
                self.flow(line, part_col, trimmed, &item);
            }
            return;
        }
        let Some((key, value_offset)) = split_key(trimmed) else {
            return;
        };
        let key_path = join(path, &key);
        self.positions.keys.insert(key_path.clone(), pos);
        let value = trimmed[value_offset..].trim_start();
        if value.is_empty() {
            return;
        }
        let value_col = part_col + trimmed.len() - value.len();
        self.positions.values.insert(
            key_path.clone(),
            Pos {
                line,
                column: value_col + 1,
            },
        );
        if value.starts_with('{') || value.starts_with('[') {
            self.flow(line, value_col, value, &key_path);
        }
    }
}

/// The key of a `key: value` line and the byte offset where its value starts.
fn split_key(text: &str) -> Option<(String, usize)> {
    if let Some(quote) = text.chars().next().filter(|c| *c == '"' || *c == '\'') {
        let close = text[1..].find(quote)? + 1;
        let after = &text[close + 1..];
        let rest = after.strip_prefix(':')?;
        if !(rest.is_empty() || rest.starts_with(' ')) {
            return None;
        }
        return Some((text[1..close].to_string(), close + 2));
    }
    let bytes = text.as_bytes();
    for (index, byte) in bytes.iter().enumerate() {
        if *byte == b':' && (index + 1 == bytes.len() || bytes[index + 1] == b' ') {
            let key = text[..index].trim_end();
            if key.is_empty() || key.starts_with(['{', '[', '"', '\'']) {
                return None;
            }
            return Some((key.to_string(), index + 1));
        }
    }
    None
}

/// The line without its `# comment` (a `#` at the start or after a space, outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut previous = ' ';
    for (index, c) in line.char_indices() {
        match quote {
            Some(open) if c == open => quote = None,
            Some(_) => {}
            // Only a quote that starts a scalar opens one; `it's` in plain text does not.
            None if (c == '"' || c == '\'')
                && (previous == ' ' || previous == ':' || previous == '-' || index == 0) =>
            {
                quote = Some(c);
            }
            None if c == '#' && (index == 0 || previous == ' ' || previous == '\t') => {
                return &line[..index];
            }
            None => {}
        }
        previous = c;
    }
    line
}

fn bracket_balance(text: &str) -> i64 {
    let mut depth = 0;
    for c in text.chars() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            _ => {}
        }
    }
    depth
}

/// Where `${...}` may look values up.
pub struct Scope<'a> {
    pub vars: &'a BTreeMap<String, String>,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

/// A failed interpolation: the byte offset of the `${` in the text and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct InterpolationError {
    pub offset: usize,
    /// The reference as written, e.g. `${vars.queue}`.
    pub reference: String,
    pub message: String,
}

/// Replaces every `${vars.NAME}` and `${env.NAME}` (or `${env.NAME:-default}`); `$${` is a
/// literal `${`. Returns the text and whether it was exactly one reference (so the result may
/// stand for a number or a boolean).
pub fn interpolate(text: &str, scope: &Scope) -> Result<(String, bool), InterpolationError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut offset = 0;
    let mut references = 0;
    while let Some(found) = rest.find('$') {
        out.push_str(&rest[..found]);
        let after = &rest[found..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
            offset += found + 3;
            continue;
        }
        let Some(inner_start) = after.strip_prefix("${") else {
            out.push('$');
            rest = &after[1..];
            offset += found + 1;
            continue;
        };
        let at = offset + found;
        let Some(close) = inner_start.find('}') else {
            return Err(InterpolationError {
                offset: at,
                reference: after.to_string(),
                message: "unclosed `${`: write `${vars.NAME}` or `${env.NAME}`, or `$${` for a literal `${`".to_string(),
            });
        };
        let inner = &inner_start[..close];
        let reference = format!("${{{inner}}}");
        let fail = |message: String| InterpolationError {
            offset: at,
            reference: reference.clone(),
            message,
        };
        let value = match inner.split_once('.') {
            Some(("vars", name)) => scope.vars.get(name).cloned().ok_or_else(|| {
                let known: Vec<&str> = scope.vars.keys().map(String::as_str).collect();
                fail(format!(
                    "undefined variable `{reference}`: declare `{name}` under `vars:` (or pass --var {name}=VALUE); declared: {}",
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ))
            })?,
            Some(("env", spec)) => {
                let (name, default) = match spec.split_once(":-") {
                    Some((name, default)) => (name, Some(default)),
                    None => (spec, None),
                };
                match ((scope.env)(name), default) {
                    (Some(value), _) => value,
                    (None, Some(default)) => default.to_string(),
                    (None, None) => {
                        return Err(fail(format!(
                            "undefined variable `{reference}`: environment variable {name} is not set; set it, or give a default: `${{env.{name}:-VALUE}}`"
                        )))
                    }
                }
            }
            _ => {
                return Err(fail(format!(
                    "unknown reference `{reference}`: expected `${{vars.NAME}}` or `${{env.NAME}}`; write `$${{` for a literal `${{` (e.g. in a shell command)"
                )))
            }
        };
        out.push_str(&value);
        references += 1;
        rest = &inner_start[close + 1..];
        offset = at + 2 + close + 1;
    }
    out.push_str(rest);
    let whole = references == 1 && text.trim().starts_with("${") && text.trim().ends_with('}') && {
        let trimmed = text.trim();
        trimmed[2..trimmed.len() - 1].find('}').is_none()
    };
    Ok((out, whole))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
name: demo   # comment
vars:
  queue: orders
broker:
  url: amqp://x
steps:
- name: look
  inspect:
    name: ${vars.queue}
    sample: 0s
-   expand: {name: q, factor: 2}
  # a comment line
- exec:
    command: |
      echo one: two
      echo three
    timeout: 5s
on_failure:
  - restore:
      name: q
";

    #[test]
    fn keys_and_values_have_positions() {
        let positions = Positions::scan(TEXT);
        assert_eq!(positions.key("name"), Pos { line: 1, column: 1 });
        assert_eq!(positions.value("name"), Pos { line: 1, column: 7 });
        assert_eq!(positions.key("vars.queue"), Pos { line: 3, column: 3 });
        assert_eq!(positions.key("steps[0]"), Pos { line: 7, column: 1 });
        assert_eq!(positions.key("steps[0].name"), Pos { line: 7, column: 3 });
        assert_eq!(
            positions.key("steps[0].inspect.name"),
            Pos { line: 9, column: 5 }
        );
        assert_eq!(
            positions.value("steps[0].inspect.sample"),
            Pos {
                line: 10,
                column: 13
            }
        );
        assert_eq!(
            positions.key("steps[1].expand"),
            Pos {
                line: 11,
                column: 5
            }
        );
        // Inside a single-line flow mapping: the entry's own position.
        assert_eq!(
            positions.value("steps[1].expand.factor"),
            Pos {
                line: 11,
                column: 31
            }
        );
        assert_eq!(
            positions.key("steps[1].expand.name"),
            Pos {
                line: 11,
                column: 14
            }
        );
        assert_eq!(
            positions.key("steps[2].exec.timeout"),
            Pos {
                line: 17,
                column: 5
            }
        );
        assert_eq!(
            positions.key("on_failure[0].restore.name"),
            Pos {
                line: 20,
                column: 7
            }
        );
    }

    #[test]
    fn columns_count_characters() {
        let positions =
            Positions::scan("name: \"dräin ✓\"\nsteps:\n- exec: {command: 'é', colour: x}\n");
        assert_eq!(
            positions.key("steps[0].exec.colour"),
            // 25 in bytes: `é` is two.
            Pos {
                line: 3,
                column: 24
            }
        );
        assert_eq!(char_column("ä✓x", 5), 3);
        assert_eq!(byte_offset("ä✓x", 3), 5);
    }

    #[test]
    fn interpolation() {
        let vars = BTreeMap::from([("q".to_string(), "orders".to_string())]);
        let env = |name: &str| (name == "HOME").then(|| "/root".to_string());
        let scope = Scope {
            vars: &vars,
            env: &env,
        };
        assert_eq!(
            interpolate("${vars.q}", &scope).unwrap(),
            ("orders".into(), true)
        );
        assert_eq!(
            interpolate("a ${vars.q}.drain ${env.HOME} $${X} $1", &scope).unwrap(),
            ("a orders.drain /root ${X} $1".into(), false)
        );
        assert_eq!(
            interpolate("${env.NOPE:-dflt}", &scope).unwrap(),
            ("dflt".into(), true)
        );
        let error = interpolate("xx ${vars.nope}", &scope).unwrap_err();
        assert_eq!(error.offset, 3);
        assert_eq!(error.reference, "${vars.nope}");
        assert!(error.message.contains("declared: q"), "{}", error.message);
        assert!(interpolate("${HOME}", &scope).is_err());
        assert!(interpolate("${vars.q", &scope).is_err());
    }
}
