// The playground: stream a completion or chat answer from a base model or any sampler
// checkpoint through the OpenAI routes, optionally from two models side by side.

import { api, streamEvents } from "./api.js";
import { reportError } from "./app.js";
import { el, number } from "./format.js";

const OPENAI = "/oai/api/v1";

function field(label, input) {
  return el("label", {}, label, input);
}

// One answer pane: text appended chunk by chunk, each chunk's token logprobs in its tooltip.
function pane(name) {
  const output = el("pre", { class: "output", "data-testid": `output-${name}`, "aria-live": "polite" });
  const status = el("p", { class: "pane-status", "data-testid": `status-${name}` });
  return { output, status, box: el("div", { class: "pane" }, status, output) };
}

function chunkOf(event, chat) {
  const choice = event.choices && event.choices[0];
  if (!choice) return null;
  if (chat) {
    const text = (choice.delta && choice.delta.content) || "";
    const lps = ((choice.logprobs && choice.logprobs.content) || []).map((t) => [t.token, t.logprob]);
    return { text, lps, finish: choice.finish_reason };
  }
  const lp = choice.logprobs;
  const lps = lp ? lp.tokens.map((t, i) => [t, lp.token_logprobs[i]]) : [];
  return { text: choice.text || "", lps, finish: choice.finish_reason };
}

export async function renderPlayground(box, query) {
  const { data: models } = await api(`${OPENAI}/models`);
  const choices = el("datalist", { id: "model-choices" }, models.map((m) => el("option", { value: m.id }, m.parent ? `checkpoint of ${m.parent}` : "base model")));
  const first = query.get("model") || (models[0] && models[0].id) || "";
  const modelA = el("input", { list: "model-choices", value: first, "aria-label": "Model", class: "model" });
  const modelB = el("input", { list: "model-choices", value: (models[0] && models[0].id) || "", "aria-label": "Second model", class: "model" });
  const mode = el("select", { "aria-label": "Mode" }, el("option", { value: "completion" }, "Completion"), el("option", { value: "chat" }, "Chat"));
  const prompt = el("textarea", { rows: 5, "aria-label": "Prompt", placeholder: "Prompt (Ctrl+Enter sends)" });
  const temperature = el("input", { type: "number", step: "0.1", min: 0, value: "0.7", "aria-label": "Temperature" });
  const topP = el("input", { type: "number", step: "0.05", min: 0, max: 1, value: "1", "aria-label": "Top p" });
  const maxTokens = el("input", { type: "number", min: 1, value: "64", "aria-label": "Max tokens" });
  const seed = el("input", { type: "number", placeholder: "none", "aria-label": "Seed" });
  const stop = el("input", { type: "text", placeholder: "e.g. \\n\\n | END", "aria-label": "Stop strings" });
  const logprobs = el("input", { type: "checkbox", "aria-label": "Show token logprobs" });
  const compare = el("input", { type: "checkbox", "aria-label": "Compare two models" });
  const send = el("button", { type: "submit" }, "Send");
  const cancel = el("button", { type: "button", disabled: true }, "Stop");
  const a = pane("a");
  const b = pane("b");
  const secondModel = field("Second model", modelB);
  const panes = el("div", { class: "panes" }, a.box);
  secondModel.hidden = true;

  const form = el("form", { class: "playground" },
    choices,
    el("div", { class: "row" }, field("Model", modelA), secondModel),
    el("div", { class: "row" }, field("Mode", mode),
      el("label", { class: "check" }, compare, "Compare two models"),
      el("label", { class: "check" }, logprobs, "Token logprobs on hover")),
    prompt,
    el("div", { class: "row params" }, field("temperature", temperature), field("top_p", topP), field("max_tokens", maxTokens),
      field("seed", seed), field("stop (separate with |)", stop)),
    el("div", { class: "row" }, send, cancel));
  box.append(el("h1", {}, "Playground"), form, panes);

  compare.addEventListener("change", () => {
    secondModel.hidden = !compare.checked;
    if (compare.checked) panes.append(b.box); else b.box.remove();
  });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit();
  });

  function body(model) {
    const chat = mode.value === "chat";
    const out = { model, max_tokens: Number(maxTokens.value), temperature: Number(temperature.value), top_p: Number(topP.value) };
    if (seed.value !== "") out.seed = Number(seed.value);
    const stops = stop.value.split("|").map((s) => s.trim().replaceAll("\\n", "\n")).filter(Boolean);
    if (stops.length) out.stop = stops;
    if (chat) {
      out.messages = [{ role: "user", content: prompt.value }];
      if (logprobs.checked) out.logprobs = true;
    } else {
      out.prompt = prompt.value;
      if (logprobs.checked) out.logprobs = 1;
    }
    return out;
  }

  async function run(target, model, signal) {
    const chat = mode.value === "chat";
    target.output.replaceChildren();
    target.status.textContent = `${model}: streaming…`;
    let finish = null;
    try {
      await streamEvents(`${OPENAI}/${chat ? "chat/completions" : "completions"}`, body(model), (event) => {
        const chunk = chunkOf(event, chat);
        if (!chunk) return;
        if (chunk.text) {
          const title = chunk.lps.map(([t, lp]) => `${JSON.stringify(t)}: ${number(lp)}`).join("\n");
          target.output.append(el("span", { title: title || null }, chunk.text));
        }
        if (chunk.finish) finish = chunk.finish;
      }, signal);
      target.status.textContent = `${model}: done (${finish || "stopped"})`;
    } catch (err) {
      target.status.textContent = `${model}: ${err.name === "AbortError" ? "stopped" : "failed"}`;
      reportError(err);
    }
  }

  let controller = null;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    controller = new AbortController();
    send.disabled = true;
    cancel.disabled = false;
    const runs = [run(a, modelA.value.trim(), controller.signal)];
    if (compare.checked) runs.push(run(b, modelB.value.trim(), controller.signal));
    await Promise.all(runs);
    send.disabled = false;
    cancel.disabled = true;
  });
  cancel.addEventListener("click", () => controller && controller.abort());
  return () => controller && controller.abort();
}
