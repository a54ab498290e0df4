// vdiff playground: one streamed chat request per settings panel, its denoising steps drawn cell
// by cell from the "canvas" events that `"stream_canvas": true` adds to each SSE chunk.
// Plain script, no framework and no build step: the OpenAI server serves this file as it is.
"use strict";

// The boxes each algorithm choice uses. The others are disabled and never sent, so that a number
// left in, say, the threshold box cannot turn a fixed schedule into threshold decoding.
const ALWAYS = ["temperature", "max_tokens"];
const USES = {
  "": ["steps", "block_length", "threshold", "factor", "cache"],
  schedule: ["steps", "block_length", "cache"],
  threshold: ["threshold", "block_length", "cache"],
  factor: ["factor", "block_length", "cache"],
  apd: ["apd_mixture_weight", "apd_kv_window", "apd_max_lookahead"],
};
// the engine's algorithm behind each choice; the server's default sends none
const LLADA = "low_confidence";
const ALGORITHM = { schedule: LLADA, threshold: LLADA, factor: LLADA, apd: "apd" };
// A rule without its number would silently fall back to a schedule: picking it fills a value.
const RULE_VALUES = { threshold: "0.9", factor: "1" };
// The compare view's pair: one token per step (as many steps as positions, one block) against
// threshold 0.9, the demo model's own default; 72 positions is the demo model's canvas.
const PRESETS = {
  left: { algorithm: "schedule", steps: "72", block_length: "72", max_tokens: "72" },
  right: { algorithm: "threshold", threshold: "0.9", max_tokens: "72" },
};
// The demo model decodes its canvas in well under a second: each step stays on screen at least
// this long so that the eye can follow it. The counters keep the real timings.
const STEP_MS = 60;
// Special tokens are long ("<|endoftext|>"): a cell shows an end token, which a model pads its
// canvas with after the answer, as EOS, and any other special token by its bare name.
const END_TOKENS = new Set(["<|endoftext|>", "<|eot_id|>", "<|im_end|>", "</s>", "<eos>"]);

function cellText(text) {
  if (END_TOKENS.has(text)) return { shown: "EOS", special: true };
  const special = /^<\|(.+)\|>$/.exec(text);
  if (special) return { shown: special[1], special: true };
  return { shown: text.replace(/\n/g, "⏎") || "∅", special: false };
}

class Panel {
  constructor(slot) {
    const id = slot.dataset.panel;
    this.root = document.getElementById("panel-template").content.firstElementChild.cloneNode(true);
    this.root.id = `panel-${id}`;
    this.root.querySelector(".panel-title").textContent = slot.dataset.title;
    this.inputs = {};
    for (const input of this.root.querySelectorAll("[data-name]")) {
      input.id = `${id}-${input.dataset.name}`; // ids must be unique: the template is used thrice
      this.inputs[input.dataset.name] = input;
    }
    for (const label of this.root.querySelectorAll("label[data-for]")) {
      label.htmlFor = `${id}-${label.dataset.for}`;
    }
    for (const [name, value] of Object.entries(PRESETS[id] || {})) this.inputs[name].value = value;
    this.inputs.algorithm.addEventListener("change", () => this.applyAlgorithm(true));
    this.applyAlgorithm(false);
    this.canvas = this.root.querySelector(".canvas");
    this.answer = this.root.querySelector(".answer");
    this.error = this.root.querySelector(".error");
    this.counters = {};
    for (const dd of this.root.querySelectorAll("[data-counter]")) {
      this.counters[dd.dataset.counter] = dd;
    }
    slot.append(this.root);
  }

  applyAlgorithm(fill) {
    const choice = this.inputs.algorithm.value;
    const used = new Set([...USES[choice], ...ALWAYS]);
    for (const [name, input] of Object.entries(this.inputs)) {
      if (name !== "algorithm") input.disabled = !used.has(name);
    }
    for (const rule of Object.keys(RULE_VALUES)) this.inputs[rule].required = choice === rule;
    if (fill && RULE_VALUES[choice] && !this.inputs[choice].value) {
      this.inputs[choice].value = RULE_VALUES[choice];
    }
  }

  // The request: OpenAI's chat fields, vdiff's decoding fields, only the boxes that hold a value.
  body(prompt) {
    const messages = [{ role: "user", content: prompt }];
    const body = { messages, stream: true, stream_canvas: true };
    const algorithm = ALGORITHM[this.inputs.algorithm.value];
    if (algorithm) body.algorithm = algorithm;
    for (const [name, input] of Object.entries(this.inputs)) {
      if (name === "algorithm" || input.disabled || input.value.trim() === "") continue;
      body[name] = input.type === "number" ? Number(input.value) : input.value;
    }
    return body;
  }

  reset() {
    clearTimeout(this.timer);
    this.queue = [];
    this.finished = false;
    this.cells = null;
    this.lit = [];
    this.rejected = []; // masked cells showing APD's drafts that the verifier did not accept
    this.committed = 0;
    this.canvas.replaceChildren();
    this.canvas.setAttribute("aria-label", "the canvas (waiting for the first step)");
    this.answer.textContent = "";
    this.error.textContent = "";
    for (const dd of Object.values(this.counters)) dd.textContent = "–";
  }

  // Runs one request to its end; shows its own errors and resolves to whether it succeeded.
  async run(prompt, key, signal) {
    this.reset();
    this.root.dataset.state = "running";
    const started = performance.now();
    const playing = this.play(signal);
    let ok = false;
    try {
      const headers = { "Content-Type": "application/json" };
      if (key) headers.Authorization = `Bearer ${key}`;
      const body = JSON.stringify(this.body(prompt));
      let response;
      try {
        response = await fetch("v1/chat/completions", { method: "POST", headers, body, signal });
      } catch (error) {
        if (error.name === "AbortError") throw error;
        throw new Error(`Could not reach the server (${error.message}).`);
      }
      if (!response.ok) throw new Error(await describeFailure(response));
      for await (const data of sseData(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          throw new Error(`The server ended the stream with an error: ${messageOf(chunk)}`);
        }
        const choice = (chunk.choices || [])[0];
        if (!choice) continue; // the usage chunk
        // a chunk's steps come before the text they completed, so the two stay in step on screen
        const at = performance.now() - started;
        for (const event of choice.canvas || []) this.queue.push({ event, at });
        if (choice.delta && choice.delta.content) this.queue.push({ text: choice.delta.content });
      }
      ok = true;
    } catch (error) {
      if (error.name === "AbortError") {
        this.queue = [];
        this.error.textContent = "Stopped.";
      } else {
        this.error.textContent = error.message;
      }
    }
    this.finished = true;
    await playing;
    if (ok && !this.cells) this.canvas.textContent = "The server sent no canvas events.";
    this.root.dataset.state = ok ? "done" : "error";
    return ok;
  }

  // Plays the queue: every text at once, at most one step per STEP_MS; resolves once it is empty
  // and the stream has ended (Stop empties it).
  play(signal) {
    return new Promise((resolve) => {
      const tick = () => {
        if (signal.aborted) this.queue = [];
        let drew = false;
        while (this.queue.length && !(drew && this.queue[0].event)) {
          const item = this.queue.shift();
          if (item.event) {
            this.draw(item.event, item.at);
            drew = true;
          } else {
            this.answer.textContent += item.text;
          }
        }
        if (this.finished && !this.queue.length) resolve();
        else this.timer = setTimeout(tick, drew ? STEP_MS : 10);
      };
      tick();
    });
  }

  // One cell per generated position (the prompt's positions are not drawn), all masked.
  layout(start) {
    this.offset = start.prompt_len;
    this.cells = [];
    for (let pos = start.prompt_len; pos < start.length; pos++) {
      const cell = document.createElement("span");
      cell.className = "cell masked";
      cell.title = `position ${pos}: masked`;
      this.cells.push(cell);
    }
    this.canvas.replaceChildren(...this.cells);
  }

  // An APD round drafts its lookahead and commits the prefix the verifier accepts; the rest of the
  // drafts stay masked. They show for that step only, dashed, so that the round's decision shows.
  showRejected(apd) {
    for (const draft of apd.drafts.slice(apd.accepted)) {
      const cell = this.cells[draft.pos - this.offset];
      if (!cell || !cell.classList.contains("masked")) continue;
      cell.classList.add("rejected");
      cell.textContent = cellText(draft.text).shown;
      cell.title = `position ${draft.pos}: drafted ${JSON.stringify(draft.text)}, not accepted`;
      this.rejected.push(cell);
    }
  }

  clearRejected() {
    for (const cell of this.rejected) {
      cell.classList.remove("rejected");
      if (cell.classList.contains("masked")) cell.textContent = "";
    }
    this.rejected = [];
  }

  draw(event, at) {
    if (event.start) this.layout(event.start);
    if (!this.cells) return; // steps before a start event cannot be placed
    for (const cell of this.lit) cell.classList.remove("now");
    this.lit = [];
    this.clearRejected();
    for (const commit of event.commits || []) {
      const cell = this.cells[commit.pos - this.offset];
      if (!cell) continue;
      const conf = Math.min(1, Math.max(0, Number(commit.conf) || 0));
      cell.classList.remove("masked");
      cell.classList.add("now");
      cell.style.setProperty("--conf", conf);
      const { shown, special } = cellText(commit.text);
      cell.classList.toggle("special", special);
      cell.textContent = shown;
      cell.title = `position ${commit.pos}: ${JSON.stringify(commit.text)}, step ${event.step}, `
        + `confidence ${conf.toFixed(3)}`;
      this.lit.push(cell);
      this.committed += 1;
    }
    if (event.apd) this.showRejected(event.apd);
    const [from, to] = event.span || [0, 0];
    this.cells.forEach((cell, i) => {
      cell.classList.toggle("span", i + this.offset >= from && i + this.offset < to);
    });
    const seconds = at / 1000;
    this.counters.nfe.textContent = String(event.nfe);
    this.counters.per_step.textContent = (this.committed / Math.max(1, event.step)).toFixed(2);
    const rate = seconds > 0 ? String(Math.round(this.committed / seconds)) : "–";
    this.counters.rate.textContent = rate;
    this.counters.masks.textContent = String(event.masks);
    const done = this.cells.length - event.masks;
    const label = `the canvas: ${done} of ${this.cells.length} positions decoded`;
    this.canvas.setAttribute("aria-label", label);
  }
}

// Server-sent events from a fetch response (EventSource can neither POST nor send a key): an event
// ends at a blank line and its data is its `data:` lines joined.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value, { stream: !done });
      const events = buffer.split(/\r\n\r\n|\n\n|\r\r/);
      buffer = done ? "" : events.pop(); // the last piece may be an unfinished event
      for (const event of events) {
        const data = event.split(/\r\n|\n|\r/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5))
          .join("\n");
        if (data) yield data;
      }
      if (done) return;
    }
  } finally {
    reader.cancel().catch(() => {}); // a reader left early (an error event) closes the connection
  }
}

// What an error body says: OpenAI's {"error": {"message"}}, the 401's {"error": "Unauthorized"},
// or failing both the body itself; never nothing.
function messageOf(body) {
  const error = body.error;
  if (typeof error === "string") return error;
  if (error && typeof error.message === "string") return error.message;
  return JSON.stringify(body);
}

async function describeFailure(response) {
  const text = await response.text();
  let said = text.trim();
  try {
    said = messageOf(JSON.parse(text));
  } catch {
    // not JSON: the text itself is the message
  }
  if (response.status === 401) {
    return `The server refused the API key (401: ${said || "Unauthorized"}). Enter the key the `
      + "server was started with (--api-key) in the API key field.";
  }
  return `The server answered ${response.status}: ${said || response.statusText || "no message"}`;
}

function main() {
  const form = document.getElementById("run-form");
  const prompt = document.getElementById("prompt");
  const key = document.getElementById("api-key");
  const runButton = document.getElementById("run");
  const stopButton = document.getElementById("stop");
  const status = document.getElementById("status");
  const slots = [...document.querySelectorAll("[data-panel]")];
  const panels = Object.fromEntries(slots.map((slot) => [slot.dataset.panel, new Panel(slot)]));
  let controller = null;

  const view = () => form.querySelector('input[name="view"]:checked').value;
  const showView = () => {
    for (const slot of slots) slot.hidden = !slot.classList.contains(`view-${view()}`);
  };
  for (const radio of form.querySelectorAll('input[name="view"]')) {
    radio.addEventListener("change", showView);
  }
  showView();

  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit(); // validates the boxes first, as the Run button does
    }
  });
  stopButton.addEventListener("click", () => controller && controller.abort());

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (controller) return; // one run (or one pair) at a time
    const text = prompt.value.trim();
    if (!text) {
      status.textContent = "Enter a prompt first.";
      prompt.focus();
      return;
    }
    const running = view() === "single" ? [panels.single] : [panels.left, panels.right];
    controller = new AbortController();
    stopButton.disabled = false;
    // a button that becomes disabled drops the focus: hand it to Stop
    if (document.activeElement === runButton) stopButton.focus();
    runButton.disabled = true;
    status.textContent = running.length > 1 ? "Running both settings…" : "Running…";
    // both requests leave before either is awaited, so that a comparison starts them together
    const signal = controller.signal;
    const apiKey = key.value.trim();
    const results = await Promise.all(running.map((panel) => panel.run(text, apiKey, signal)));
    const stopped = signal.aborted;
    controller = null;
    runButton.disabled = false;
    if (document.activeElement === stopButton) runButton.focus();
    stopButton.disabled = true;
    const failed = running.filter((_, i) => !results[i]);
    if (stopped) status.textContent = "Stopped.";
    // the status line is the live region a screen reader announces; each panel shows its own error
    else if (failed.length) status.textContent = `Failed: ${failed[0].error.textContent}`;
    else status.textContent = "Done.";
  });
  document.body.dataset.ready = "true"; // for scripts that drive the page
}

main();
