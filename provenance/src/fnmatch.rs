//! Python `fnmatch.fnmatchcase` semantics, as in-toto uses for artifact rules.
//!
//! `*` matches any run of characters including `/`, `?` one character,
//! `[seq]` / `[!seq]` a character class with ranges; a `[` without a closing
//! `]` is literal; there is no backslash escaping. Matching is case-sensitive
//! (POSIX `normcase` is the identity).

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Star,
    Any,
    Lit(char),
    Class {
        negated: bool,
        items: Vec<(char, char)>,
    },
    /// An empty class (`[]` can't occur, but `[z-a]` can): matches nothing.
    Never,
}

fn compile(pat: &str) -> Vec<Tok> {
    let p: Vec<char> = pat.chars().collect();
    let n = p.len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let c = p[i];
        i += 1;
        match c {
            '*' => {
                if out.last() != Some(&Tok::Star) {
                    out.push(Tok::Star);
                }
            }
            '?' => out.push(Tok::Any),
            '[' => {
                // Find the closing ']' the way fnmatch.translate does: a ']'
                // right after '[' or '[!' is a member, not the end.
                let mut j = i;
                if j < n && p[j] == '!' {
                    j += 1;
                }
                if j < n && p[j] == ']' {
                    j += 1;
                }
                while j < n && p[j] != ']' {
                    j += 1;
                }
                if j >= n {
                    out.push(Tok::Lit('['));
                    continue;
                }
                let stuff = &p[i..j];
                i = j + 1;
                if stuff == ['!'] {
                    out.push(Tok::Any);
                    continue;
                }
                let (negated, body) = match stuff.first() {
                    Some('!') => (true, &stuff[1..]),
                    _ => (false, stuff),
                };
                let mut items = Vec::new();
                let mut k = 0;
                while k < body.len() {
                    if k + 2 < body.len() && body[k + 1] == '-' {
                        // A reversed range is empty; Python 3.11 drops it.
                        if body[k] <= body[k + 2] {
                            items.push((body[k], body[k + 2]));
                        }
                        k += 3;
                    } else {
                        items.push((body[k], body[k]));
                        k += 1;
                    }
                }
                if items.is_empty() {
                    out.push(if negated { Tok::Any } else { Tok::Never });
                } else {
                    out.push(Tok::Class { negated, items });
                }
            }
            c => out.push(Tok::Lit(c)),
        }
    }
    out
}

fn single(t: &Tok, c: char) -> bool {
    match t {
        Tok::Any => true,
        Tok::Lit(l) => *l == c,
        Tok::Class { negated, items } => items.iter().any(|(a, b)| *a <= c && c <= *b) != *negated,
        Tok::Never | Tok::Star => false,
    }
}

/// True when `name` matches `pattern` in full.
pub fn fnmatch(pattern: &str, name: &str) -> bool {
    let toks = compile(pattern);
    let s: Vec<char> = name.chars().collect();
    // Iterative wildcard matching with backtracking to the last star:
    // O(len(name) * len(pattern)) worst case, no recursion.
    let (mut ti, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if ti < toks.len() && toks[ti] == Tok::Star {
            star = Some((ti, si));
            ti += 1;
        } else if ti < toks.len() && single(&toks[ti], s[si]) {
            ti += 1;
            si += 1;
        } else if let Some((st, ss)) = star {
            ti = st + 1;
            si = ss + 1;
            star = Some((st, ss + 1));
        } else {
            return false;
        }
    }
    toks[ti..].iter().all(|t| *t == Tok::Star)
}

/// A pattern that matches `literal` and nothing else (Python's `glob.escape`
/// for fnmatch): each of `*`, `?` and `[` becomes a one-character class.
pub fn escape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        match c {
            '*' | '?' | '[' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            c => out.push(c),
        }
    }
    out
}

/// The entries of `names` that match `pattern` (Python's `fnmatch.filter`).
pub fn filter<'a, I>(names: I, pattern: &str) -> Vec<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    names.into_iter().filter(|n| fnmatch(pattern, n)).collect()
}

#[cfg(test)]
mod tests {
    use super::{escape, fnmatch};

    #[test]
    fn an_escaped_name_matches_itself_only() {
        for name in [
            "a*b",
            "x?",
            "[ab]",
            "dist/[v1]/*.tar",
            "plain/name.txt",
            "]",
            "[!x]",
        ] {
            assert!(fnmatch(&escape(name), name), "{name}");
        }
        assert!(!fnmatch(&escape("a*b"), "axxb"));
        assert!(!fnmatch(&escape("x?"), "xy"));
        assert!(!fnmatch(&escape("[ab]"), "a"));
        assert_eq!(escape("plain/name.txt"), "plain/name.txt");
    }

    #[test]
    fn basics() {
        assert!(fnmatch("*", ""));
        assert!(fnmatch("*", "a/b/c"));
        assert!(fnmatch("*.c", "src/x.c"));
        assert!(!fnmatch("*.c", "x.h"));
        assert!(fnmatch("a?c", "abc"));
        assert!(!fnmatch("a?c", "ac"));
        assert!(fnmatch("src/*", "src/a/b"));
        assert!(!fnmatch("src/*", "srcx"));
        assert!(fnmatch("hello", "hello"));
        assert!(!fnmatch("Hello", "hello"));
        assert!(fnmatch("a*b*c", "axxbyyc"));
        assert!(!fnmatch("a*b*c", "axxbyy"));
        assert!(fnmatch("*\n", "x\n"));
    }

    #[test]
    fn classes() {
        assert!(fnmatch("[ab]x", "bx"));
        assert!(!fnmatch("[ab]x", "cx"));
        assert!(fnmatch("[!ab]x", "cx"));
        assert!(!fnmatch("[!ab]x", "ax"));
        assert!(fnmatch("[a-c]", "b"));
        assert!(fnmatch("[]]", "]"));
        assert!(fnmatch("[!]]", "a"));
        assert!(!fnmatch("[!]]", "]"));
        assert!(fnmatch("[a-]", "-"));
        assert!(fnmatch("[", "["));
        assert!(fnmatch("[a", "[a"));
        assert!(!fnmatch("[z-a]", "m"));
        assert!(fnmatch("[!]", "[!]"));
        assert!(fnmatch("[\\]", "\\"));
        assert!(fnmatch("[*]", "*"));
        assert!(!fnmatch("[*]", "x"));
    }
}
