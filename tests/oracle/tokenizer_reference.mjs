// tokenizer_reference.mjs - the tokenizer's reference corpus and ids, from Hugging Face `tokenizers`.
//
// What it protects: dsrt's tokenizer must give exactly the ids of the Rust `tokenizers` library
// (the Python reference's), so the ids in tests/fixtures/tokenizer come from an independent
// implementation: @anush008/tokenizers 0.6.0, a napi binding of tokenizers 0.22.2 (FORMATS.md §3).
// The corpus is generated here from a fixed seed, so it can be regenerated and reviewed; it is
// weighted towards what breaks tokenizers (regex class boundaries, whitespace and CRLF runs, digit
// runs, scripts the split regexes name, emoji/ZWJ, combining marks, added tokens inside text).
//
//   mkdir -p /tmp/tokref && (cd /tmp/tokref && npm install @anush008/tokenizers@0.6.0)
//   NODE_PATH=/tmp/tokref/node_modules node tests/oracle/tokenizer_reference.mjs \
//       "$(tools/fetch_tokenizer.sh)" tests/fixtures/tokenizer          # writes corpus.json, expected.json
//   NODE_PATH=... node tests/oracle/tokenizer_reference.mjs TOKENIZER_JSON --bench CORPUS_JSON
//                                                                       # prints the reference's encode MB/s
import { createRequire } from "node:module";
import { writeFileSync, readFileSync } from "node:fs";
import path from "node:path";

const require = createRequire(import.meta.url);
const { Tokenizer } = require("@anush008/tokenizers");

const [tokenizerPath, outOrFlag, benchCorpus] = process.argv.slice(2);
if (!tokenizerPath || !outOrFlag) {
  console.error("usage: tokenizer_reference.mjs TOKENIZER_JSON OUT_DIR | TOKENIZER_JSON --bench CORPUS_JSON");
  process.exit(2);
}
const tok = Tokenizer.fromFile(tokenizerPath);
const encode = async (s) => Array.from((await tok.encode(s, null, { addSpecialTokens: false })).getIds());

if (outOrFlag === "--bench") {
  const corpus = JSON.parse(readFileSync(benchCorpus, "utf8"));
  const bytes = corpus.reduce((n, s) => n + Buffer.byteLength(s, "utf8"), 0);
  for (const s of corpus.slice(0, 500)) await encode(s); // warm up
  let best = Infinity;
  for (let round = 0; round < 3; round++) {
    const t0 = process.hrtime.bigint();
    for (const s of corpus) await encode(s);
    best = Math.min(best, Number(process.hrtime.bigint() - t0) / 1e9);
  }
  const one = corpus.join("\n");
  const t1 = process.hrtime.bigint();
  await encode(one);
  const oneS = Number(process.hrtime.bigint() - t1) / 1e9;
  console.log(`reference (@anush008/tokenizers 0.6.0): ${(bytes / 1e6).toFixed(2)} MB in ${corpus.length} strings: ` +
              `${(bytes / 1e6 / best).toFixed(2)} MB/s; as one string: ${(Buffer.byteLength(one) / 1e6 / oneS).toFixed(2)} MB/s`);
  process.exit(0);
}

// ---- deterministic generator (xorshift32; Math.random is not seedable) ----
let state = 0x9e3779b9;
const rnd = () => { state ^= state << 13; state >>>= 0; state ^= state >>> 17; state ^= state << 5; state >>>= 0; return state / 4294967296; };
const int = (n) => Math.floor(rnd() * n);
const pick = (a) => a[int(a.length)];
const cp = (c) => String.fromCodePoint(c);

const english = ["The quick brown fox jumps over the lazy dog.", "Hello, world!", "It's a test; isn't it?",
  "I'm here — don't worry.", "e.g. U.S.A. vs. Ph.D.", "Mr. O'Neil's car", "they'll we've you'd",
  "HELLO World hello WORLD", "ALL-CAPS and snake_case and camelCase", "email: someone@example.com",
  "https://example.org/path?q=1&x=%20#frag", "price: $1,234.56 (approx.)", "3.14159 2.71828 1e-10",
  "naïve café résumé jalapeño", "Straße Ærøskøbing Łódź", "“quoted” ‘single’ «guillemets»", "..." ];
const chinese = ["你好，世界！", "深度求索是一家人工智能公司。", "我爱北京天安门", "这是一个测试：数字123和English混合。",
  "龘龘龥龦", "《红楼梦》第一回", "繁體中文與簡體中文", "一二三四五六七八九十"];
const japanese = ["こんにちは世界", "カタカナとひらがな", "東京は日本の首都です。", "ｶﾀｶﾅ半角", "ー〜・「引用」",
  "ゟ゠ヿ゛゜", "令和元年"];
const korean = ["안녕하세요 세계", "한국어 텍스트 테스트입니다.", "ㄱㄴㄷ ㅏㅑㅓ", "서울특별시"];
const other = ["Привет, мир!", "Γειά σου Κόσμε", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
  "Tiếng Việt có dấu", "ཀུན་མཁྱེན", "გამარჯობა", "Ελληνικά ΑΒΓ", "১২৩ ৪৫৬", "٣٤٥ ۱۲۳", "x² + y³ = z⁴", "Ⅻ ⅻ ① ⑳",
  "½ ¾ ⅞", "０１２３ＡＢＣ", "𝟘𝟙𝟚 𝐀𝐁𝐂"];
const code = ["def f(x):\n    return x**2\n", "int main() {\n\tprintf(\"%d\\n\", 42);\n}\n",
  "for (let i = 0; i < n; i++) { a[i] += b[i]; }", "local t = {1, 2, 3} -- comment", "if (a && b || !c) x->y = *p;",
  "SELECT * FROM users WHERE id = 1;", "<div class=\"x\">&amp;</div>", "{\"key\": [1, 2.5, null, true]}",
  "$ ls -la | grep foo > out.txt 2>&1", "fn main() -> Result<(), Box<dyn Error>> {}", "    \n\t\t// indented\r\n",
  "#include <stdio.h>", "a=b+c*d/e-f%g", "x:=y; z::w", "__init__ self.__dict__", "0x1F 0b1010 0o777 1_000_000",
  "@decorator\nclass A(B):\n    pass"];
const emoji = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵🇺🇸", "❤️", "🧑🏿‍💻", "1️⃣", "👩‍❤️‍💋‍👨", "🤷‍♀️", "✊🏾", "🫠", "©️®️™️", "⌚⏰"];
const combining = ["e\u0301", "a\u0300\u0316", "Z\u0351\u036b\u0343\u036a\u0302\u036b", "\u0301leading", "n\u0303o\u0308",
  "ก\u0e34\u0e4a", "क\u094d\u0937", "\u05d0\u05b8", "\u3099\u309a", "A\u20dd", "\u0300\u0300\u0300"];
const spaces = [" ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\n\n", "\r\n\r\n", " \n", "\n ", " \r\n ", "\t\n\t",
  "\u00a0", "\u3000", "\u2003", "\u2009", "\u200b", "\u180e", "\u0085", "\u2028", "\u2029", "\u202f", "\u205f",
  "\u1680", "\u000b", "\u000c", "\u001c", "\u001f", "\ufeff", "      ", "\n\n\n\n", " \t \t "];
const digits = () => { const n = 1 + int(14); let s = ""; for (let i = 0; i < n; i++) s += String(int(10)); return s; };
const special = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>", "<|EOT|>",
  "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁sep｜>", "<｜place▁holder▁no▁7｜>",
  "<｜place▁holder▁no▁799｜>", "<｜User", "｜>", "<|EOT", "<｜<｜User｜>｜>", "<｜Assistant｜><｜Assistant｜>"];
const punct = ["!", "?", ".", ",", ";", ":", "-", "—", "–", "…", "(", ")", "[", "]", "{", "}", "'", "\"", "`", "~",
  "+", "=", "<", ">", "|", "\\", "/", "#", "$", "%", "^", "&", "*", "_", "@", "€", "£", "¥", "§", "¶", "•", "°",
  "±", "×", "÷", "→", "⇒", "∀", "∑", "√", "∞", "≠", "≤", "≥", "、", "。", "，", "！", "？", "：", "（", "）", "【", "】"];
const words = ["the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as",
  "with", "his", "they", "I", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "not",
  "what", "all", "were", "we", "when", "your", "can", "said", "there", "use", "an", "each", "which", "she", "do",
  "how", "their", "if", "will", "up", "other", "about", "out", "many", "then", "them", "these", "so", "some",
  "her", "would", "make", "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see",
  "tokenization", "internationalization", "DeepSeek", "Transformer", "GPU", "CUDA", "Lua", "PCRE2", "xyzzy", "Aaaaaaaa"];
// blocks for random code points: [from, to]; surrogates excluded (not scalar values)
const blocks = [[0x20, 0x7e], [0x00, 0x1f], [0x80, 0xff], [0x100, 0x24f], [0x250, 0x2ff], [0x300, 0x36f], [0x370, 0x3ff],
  [0x400, 0x4ff], [0x530, 0x58f], [0x590, 0x5ff], [0x600, 0x6ff], [0x900, 0x97f], [0x980, 0x9ff], [0xe00, 0xe7f],
  [0xf00, 0xfff], [0x10a0, 0x10ff], [0x1100, 0x11ff], [0x1200, 0x137f], [0x13a0, 0x13ff], [0x1e00, 0x1eff],
  [0x2000, 0x206f], [0x2070, 0x209f], [0x20a0, 0x20cf], [0x2100, 0x214f], [0x2150, 0x218f], [0x2190, 0x21ff],
  [0x2200, 0x22ff], [0x2460, 0x24ff], [0x2500, 0x257f], [0x2600, 0x26ff], [0x2e80, 0x2eff], [0x3000, 0x303f],
  [0x3040, 0x30ff], [0x3100, 0x312f], [0x3130, 0x318f], [0x3400, 0x4dbf], [0x4e00, 0x9fff], [0xa000, 0xa4cf],
  [0xac00, 0xd7a3], [0xe000, 0xe0ff], [0xf900, 0xfaff], [0xfe30, 0xfe4f], [0xff00, 0xffef], [0xfff0, 0xffff],
  [0x10000, 0x1007f], [0x10400, 0x1044f], [0x1d400, 0x1d7ff], [0x1f300, 0x1f5ff], [0x1f600, 0x1f64f],
  [0x1f900, 0x1f9ff], [0x20000, 0x2a6df], [0xe0000, 0xe007f], [0xf0000, 0xf00ff]];
const randomChar = () => { const [a, b] = pick(blocks); return cp(a + int(b - a + 1)); };
const randomUnicode = () => { let s = ""; const n = 1 + int(20); for (let i = 0; i < n; i++) s += randomChar(); return s; };
const sentence = () => { let s = ""; const n = 1 + int(10); for (let i = 0; i < n; i++) s += (i ? pick([" ", " ", " ", "  ", ", ", ". ", "\n", "-", "_", "'"]) : "") + pick(words); return s; };
const pieces = [() => pick(english), () => pick(chinese), () => pick(japanese), () => pick(korean), () => pick(other),
  () => pick(code), () => pick(emoji), () => pick(combining), () => pick(spaces), digits, () => pick(special),
  () => pick(punct), sentence, randomUnicode, randomChar, () => pick(words), () => pick(spaces) + pick(spaces)];

const corpus = [];
const seen = new Set();
const add = (s) => { if (!seen.has(s)) { seen.add(s); corpus.push(s); } };
for (const list of [english, chinese, japanese, korean, other, code, emoji, combining, spaces, special, punct, words]) list.forEach(add);
add(""); add("Hi");
for (let i = 0; i < 40; i++) add("1".repeat(i + 1));
for (let i = 0; i < 20; i++) add(" ".repeat(i + 1) + "x" + " ".repeat(i) + "\n".repeat(i % 4) + "y");
while (corpus.length < 11990) {
  const n = 1 + int(6);
  let s = "";
  for (let i = 0; i < n; i++) s += pick(pieces)();
  if (s.length > 120) s = Array.from(s).slice(0, 60 + int(60)).join(""); // whole code points: no lone surrogates
  add(s);
}
// long pieces (one regex match each): BPE over thousands of symbols, and the added-token scan
const letters = (n, from, span) => { let s = ""; for (let i = 0; i < n; i++) s += cp(from + int(span)); return s; };
add(letters(3000, 0x61, 26)); add(letters(2000, 0x41, 58)); add("a".repeat(4097)); add(letters(1500, 0x4e00, 0x51a6));
add(letters(1000, 0xac00, 0x2ba4)); add("1".repeat(1001)); add(" ".repeat(2000) + "x"); add("\r\n".repeat(700));
add("<｜User".repeat(300) + "｜>"); add("é".repeat(1500) + "\u0301".repeat(500));
const expected = [];
for (const s of corpus) expected.push(await encode(s));
const lines = (xs) => "[\n" + xs.map((x) => JSON.stringify(x)).join(",\n") + "\n]\n";
writeFileSync(path.join(outOrFlag, "corpus.json"), lines(corpus));
writeFileSync(path.join(outOrFlag, "expected.json"), lines(expected));
console.log(`${corpus.length} strings, ${expected.reduce((n, x) => n + x.length, 0)} ids`);
