//! A fast path for the V2 request JSON: a strict, allocation-light reader for the everyday shape
//! of a request (ASCII-or-UTF-8 names without escapes, tensors as arrays of plain numbers).
//!
//! serde_json spends most of a large request's decode time on the per-element machinery of
//! `data` (visitor calls, the general number parser); this reader parses those arrays in one
//! tight loop. It never reports an error of its own: whenever the input is anything it does
//! not handle, or is not valid JSON, it returns `None` and the caller decodes with serde_json,
//! which then gives the answer (and the error message). When it does return a request, that
//! request is exactly what serde_json would have produced, bit for bit: numbers take the same
//! exact path (`significand / 10^k`, one correctly rounded division, for at most 19 digits and
//! 22 decimals; other floats are handed to serde_json one token at a time), and every
//! difference in kind (a large integer, a string element, an escape, a duplicate field) is
//! left to serde_json. `codec::decode_request_reference` and the `v2_body` fuzz target check
//! that equivalence.

use crate::request_json::{InputJson, OutputJson, Parameters, RequestJson, Scalars};

/// Nesting deeper than this goes to serde_json (whose own limit is 128).
const MAX_DEPTH: u32 = 64;

/// Powers of ten exact in an `f64`.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Parse `json` as a V2 inference request, or `None` to leave it to serde_json.
pub(crate) fn parse(json: &[u8]) -> Option<RequestJson> {
    let mut r = Reader {
        b: json,
        i: 0,
        depth: 0,
    };
    let req = r.request()?;
    r.ws();
    (r.i == json.len()).then_some(req)
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
    depth: u32,
}

/// Set a field once: a second occurrence is serde's "duplicate field" error.
fn once<T>(slot: &mut Option<T>, v: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(v);
    Some(())
}

impl<'a> Reader<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    /// The next non-whitespace byte, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.ws();
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// `null`, consumed, or nothing consumed.
    fn null(&mut self) -> bool {
        self.peek() == Some(b'n') && self.literal(b"null").is_some()
    }

    /// A string without escapes or control characters.
    fn str(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            match *self.b.get(self.i)? {
                b'"' => break,
                b'\\' | 0..=0x1f => return None,
                _ => self.i += 1,
            }
        }
        let s = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        self.i += 1;
        Some(s)
    }

    fn bool(&mut self) -> Option<bool> {
        match self.peek()? {
            b't' => self.literal(b"true").map(|_| true),
            b'f' => self.literal(b"false").map(|_| false),
            _ => None,
        }
    }

    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Option<T>) -> Option<T> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        let v = f(self);
        self.depth -= 1;
        v
    }

    /// `{ "key": value, ... }`, calling `field` with each key, the reader at its value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.nested(|r| {
            r.eat(b'{')?;
            if r.peek()? == b'}' {
                r.i += 1;
                return Some(());
            }
            loop {
                let key = r.str()?;
                r.eat(b':')?;
                field(r, key)?;
                match r.peek()? {
                    b',' => r.i += 1,
                    b'}' => {
                        r.i += 1;
                        return Some(());
                    }
                    _ => return None,
                }
            }
        })
    }

    /// `[ value, ... ]`, calling `element` with the reader at each element. The same loop as
    /// `object`'s, written out: one shared loop taking the brackets as arguments cost 6 % more
    /// instructions per decode (`data` arrays are the hot path; callgrind, `decode_bench`).
    fn array(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.nested(|r| {
            r.eat(b'[')?;
            if r.peek()? == b']' {
                r.i += 1;
                return Some(());
            }
            loop {
                element(r)?;
                match r.peek()? {
                    b',' => r.i += 1,
                    b']' => {
                        r.i += 1;
                        return Some(());
                    }
                    _ => return None,
                }
            }
        })
    }

    /// Any JSON value, checked and passed over (an unknown field or parameter).
    fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'{' => self.object(|r, _| r.skip()),
            b'[' => self.array(Self::skip),
            b'"' => self.str().map(drop),
            b't' | b'f' => self.bool().map(drop),
            b'n' => self.literal(b"null"),
            _ => self.number().map(drop),
        }
    }

    /// One number token by the JSON grammar: its start and end, and whether it is an integer.
    fn number(&mut self) -> Option<(usize, usize, bool)> {
        self.ws();
        let b = self.b;
        let start = self.i;
        let mut i = start;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        match *b.get(i)? {
            b'0' => i += 1,
            b'1'..=b'9' => {
                while b.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
            }
            _ => return None,
        }
        let mut int = true;
        if b.get(i) == Some(&b'.') {
            int = false;
            i += 1;
            let f = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == f {
                return None;
            }
        }
        if let Some(b'e' | b'E') = b.get(i) {
            int = false;
            i += 1;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            let e = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == e {
                return None;
            }
        }
        self.i = i;
        Some((start, i, int))
    }

    /// A non-negative integer that fits 19 digits (serde's `u64`).
    fn u64(&mut self) -> Option<u64> {
        let (s, e, int) = self.number()?;
        let digits = &self.b[s..e];
        if !int || digits[0] == b'-' || digits.len() > 19 {
            return None;
        }
        Some(
            digits
                .iter()
                .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0')),
        )
    }

    /// One number of a `data` array as serde_json and `Flatten` would store it, or `None` for
    /// an integer beyond 2^53 (which serde keeps as an integer) or anything not a number.
    #[inline]
    fn element(&mut self) -> Option<f64> {
        let b = self.b;
        let start = self.i;
        let mut i = start;
        let neg = b.get(i) == Some(&b'-');
        if neg {
            i += 1;
        }
        let first = i;
        let mut sig: u64 = 0;
        match *b.get(i)? {
            b'0' => i += 1,
            b'1'..=b'9' => {
                while let Some(d @ b'0'..=b'9') = b.get(i) {
                    sig = sig.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
                    i += 1;
                }
            }
            _ => return None,
        }
        let int_digits = i - first;
        let mut decimals = 0;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let f = i;
            while let Some(d @ b'0'..=b'9') = b.get(i) {
                sig = sig.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
                i += 1;
            }
            decimals = i - f;
            if decimals == 0 {
                return None;
            }
        }
        let exponent = matches!(b.get(i), Some(b'e' | b'E'));
        let exact = int_digits + decimals <= 19 && sig <= 1 << 53 && decimals < POW10.len();
        if !exponent && exact {
            self.i = i;
            // serde_json: `sig as f64`, divided once by an exact power of ten; `-0` is -0.0.
            let v = sig as f64 / POW10[decimals];
            return Some(if neg { -v } else { v });
        }
        // Anything else: the token's own grammar, then serde_json's parser for that token.
        self.i = start;
        let (s, e, int) = self.number()?;
        if int {
            // A whole number of more than 19 digits or beyond 2^53: serde keeps an integer
            // (or a float beyond u64), which `Flatten` stores differently.
            return None;
        }
        serde_json::from_slice(&self.b[s..e]).ok()
    }

    /// `data`: a number, or (nested) arrays of numbers, in row-major order.
    fn scalars(&mut self) -> Option<Scalars> {
        let mut out = Vec::new();
        if self.peek()? == b'[' {
            self.flatten(&mut out)?;
        } else {
            out.push(self.element()?);
        }
        Some(Scalars::Numbers(out))
    }

    fn flatten(&mut self, out: &mut Vec<f64>) -> Option<()> {
        self.array(|r| {
            if r.peek()? == b'[' {
                r.flatten(out)
            } else {
                out.push(r.element()?);
                Some(())
            }
        })
    }

    fn parameters(&mut self) -> Option<Option<Parameters>> {
        if self.null() {
            return Some(None);
        }
        let (mut size, mut data, mut output) = (None, None, None);
        self.object(|r, key| match key {
            "binary_data_size" => once(&mut size, if r.null() { None } else { Some(r.u64()?) }),
            "binary_data" => once(&mut data, if r.null() { None } else { Some(r.bool()?) }),
            "binary_data_output" => {
                once(&mut output, if r.null() { None } else { Some(r.bool()?) })
            }
            _ => r.skip(),
        })?;
        Some(Some(Parameters {
            binary_data_size: size.flatten(),
            binary_data: data.flatten(),
            binary_data_output: output.flatten(),
        }))
    }

    fn input(&mut self) -> Option<InputJson> {
        let (mut name, mut shape, mut datatype, mut parameters, mut data) =
            (None, None, None, None, None);
        self.object(|r, key| match key {
            "name" => once(&mut name, r.str()?.to_string()),
            "shape" => {
                let mut dims = Vec::new();
                r.array(|r| {
                    dims.push(r.u64()?);
                    Some(())
                })?;
                once(&mut shape, dims)
            }
            "datatype" => once(&mut datatype, r.str()?.to_string()),
            "parameters" => once(&mut parameters, r.parameters()?),
            "data" => once(&mut data, if r.null() { None } else { Some(r.scalars()?) }),
            _ => r.skip(),
        })?;
        Some(InputJson {
            name: name?,
            shape: shape?,
            datatype: datatype?,
            parameters: parameters.flatten(),
            data: data.flatten(),
        })
    }

    fn output(&mut self) -> Option<OutputJson> {
        let (mut name, mut parameters) = (None, None);
        self.object(|r, key| match key {
            "name" => once(&mut name, r.str()?.to_string()),
            "parameters" => once(&mut parameters, r.parameters()?),
            _ => r.skip(),
        })?;
        Some(OutputJson {
            name: name?,
            parameters: parameters.flatten(),
        })
    }

    fn request(&mut self) -> Option<RequestJson> {
        let (mut id, mut parameters, mut inputs, mut outputs) = (None, None, None, None);
        self.object(|r, key| match key {
            "id" => once(
                &mut id,
                if r.null() {
                    None
                } else {
                    Some(r.str()?.to_string())
                },
            ),
            "parameters" => once(&mut parameters, r.parameters()?),
            "inputs" => {
                let mut list = Vec::new();
                r.array(|r| {
                    list.push(r.input()?);
                    Some(())
                })?;
                once(&mut inputs, list)
            }
            "outputs" => {
                let list = if r.null() {
                    None
                } else {
                    let mut list = Vec::new();
                    r.array(|r| {
                        list.push(r.output()?);
                        Some(())
                    })?;
                    Some(list)
                };
                once(&mut outputs, list)
            }
            _ => r.skip(),
        })?;
        Some(RequestJson {
            id: id.flatten(),
            parameters: parameters.flatten(),
            inputs: inputs?,
            outputs: outputs.flatten(),
        })
    }
}
