"""The page `convmixer serve` shows at GET /: drop (or choose) an image, see the top classes as bars.

One self-contained HTML file (no external scripts, styles or fonts); it POSTs the image to `predict` with fetch(),
as the multipart field `file`, and draws the answer's `top_k` or its error `detail`.
"""

import html

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ConvMixer</title>
<style>
  body { font: 16px/1.45 system-ui, sans-serif; max-width: 38rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin-bottom: 0; }
  .model { color: #666; margin-top: .2rem; }
  #drop { display: block; border: 2px dashed #aaa; border-radius: 8px; padding: 1.5rem; text-align: center;
          cursor: pointer; }
  #drop.over { border-color: #2b6cd4; background: #eef4fd; }
  #preview { display: block; height: 10rem; max-width: 100%; object-fit: contain; margin: 1rem auto; }
  #preview.small { image-rendering: pixelated; }
  .row { display: grid; grid-template-columns: 9rem 1fr 4.5rem; gap: .6rem; align-items: center; margin: .35rem 0; }
  .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .track { background: #eee; border-radius: 3px; }
  .bar { background: #2b6cd4; height: 1.1rem; border-radius: 3px; min-width: 2px; }
  .pct { text-align: right; font-variant-numeric: tabular-nums; }
  #error { color: #b00020; }
</style>
</head>
<body>
<h1>ConvMixer</h1>
<p class="model">{{model}}</p>
<label id="drop">Drop an image here, or <u>choose one</u>
  <input id="file" type="file" accept="image/*" hidden>
</label>
<img id="preview" alt="the image sent" hidden>
<p id="error" role="alert"></p>
<div id="bars" aria-live="polite"></div>
<script>
const drop = document.getElementById("drop"), input = document.getElementById("file");
const preview = document.getElementById("preview"), bars = document.getElementById("bars");
const error = document.getElementById("error");

function row(entry) {
  const div = (cls, text) => Object.assign(document.createElement("div"), {className: cls, textContent: text || ""});
  const percent = (100 * entry.prob).toFixed(1) + "%";
  const line = div("row"), track = div("track"), bar = div("bar");
  bar.style.width = percent;
  track.append(bar);
  line.append(div("name", entry["class"]), track, div("pct", percent));
  line.title = entry["class"] + ": " + percent;
  return line;
}

async function classify(file) {
  if (!file) return;
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  bars.replaceChildren();
  error.textContent = "";
  const form = new FormData();
  form.append("file", file);
  try {
    const response = await fetch("predict", {method: "POST", body: form});
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.detail || response.statusText);
    bars.replaceChildren(...answer.top_k.map(row));
  } catch (err) {
    error.textContent = err.message;
  }
}

preview.addEventListener("load", () => preview.classList.toggle("small", preview.naturalHeight < 80));
input.addEventListener("change", () => classify(input.files[0]));
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  classify(event.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""


def page(model: str) -> str:
    """The page, with `model` (plain text: the checkpoint, its classes and input size) under the title."""
    return PAGE.replace("{{model}}", html.escape(model))
