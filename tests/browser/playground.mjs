// Drives servekit's playground in headless Chromium; prints one JSON object of what it saw.
// Usage: node playground.mjs URL API_KEY SCREENSHOT.png
import { chromium } from "playwright-core";

const [url, apiKey, screenshot] = process.argv.slice(2);
const TIMEOUT_MS = 60_000;
const result = { steps: [] };

async function runningCount() {
  const response = await fetch(`${url}/metrics`, { headers: { Authorization: `Bearer ${apiKey}` } });
  const text = await response.text();
  // The server-wide sample (no worker label).
  const line = text.split("\n").find((l) => l.startsWith("servekit:num_requests_running{") && !l.includes("worker="));
  return Number(line.trim().split(" ").pop());
}

async function until(predicate, what) {
  const deadline = Date.now() + TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (await predicate()) return;
    await new Promise((resolve) => setTimeout(resolve, 50)); // polling, bounded by the deadline
  }
  throw new Error(`timed out waiting for ${what}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  const consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  const external = [];
  page.on("request", (r) => { if (!r.url().startsWith(url)) external.push(r.url()); });

  await page.goto(url + "/", { waitUntil: "load" }); // the browser's root leads to the playground
  result.landed = page.url();
  // Behind the API key: the page says so, then the key is entered once and kept.
  await page.waitForFunction(() => document.getElementById("status").textContent.includes("API key"));
  result.askedForKey = await page.textContent("#status");
  await page.fill("#api-key", apiKey);
  await page.click("#save-key");
  await page.waitForFunction(() => document.querySelectorAll("#model option").length > 0);
  result.models = await page.$$eval("#model option", (os) => os.map((o) => o.value));
  result.storedKey = await page.evaluate(() => localStorage.getItem("servekit.apiKey"));
  await page.reload({ waitUntil: "load" });
  await page.waitForFunction(() => document.querySelectorAll("#model option").length > 0);
  result.modelsAfterReload = await page.$$eval("#model option", (os) => os.length);

  result.markdown = await page.evaluate(() => window.renderMarkdown(
    "# Title\n<img src=x onerror=alert(1)> **bold** *it* `<b>code</b>`\n- one\n- two\n\n" +
    "```\nif (a < b) {}\n```\n[ok](https://example.org) [bad](javascript:alert(1))"));

  // 1. A short reply, streamed to its end.
  await page.fill("#system", "You are terse.");
  await page.fill("#max-tokens", "12");
  await page.$eval("#temperature", (e) => { e.value = "0"; e.dispatchEvent(new Event("input")); });
  await page.fill("#prompt", "Say hello in **bold**");
  await page.press("#prompt", "Enter");
  await page.waitForSelector(".message.assistant[data-done]", { timeout: TIMEOUT_MS });
  result.firstReply = {
    done: await page.getAttribute(".message.assistant", "data-done"),
    text: await page.textContent(".message.assistant"),
    ttft: await page.textContent("#ttft"),
    tps: await page.textContent("#tps"),
    tokens: await page.textContent("#tokens"),
    user: await page.textContent(".message.user"),
  };

  // 2. A long reply, stopped mid-way: the server must stop generating it.
  await page.fill("#max-tokens", "400");
  await page.fill("#prompt", "Tell me a very long story");
  await page.press("#prompt", "Enter");
  const last = ".message.assistant >> nth=1";
  await until(async () => ((await page.textContent(last)) || "").length > 0, "the long reply to start");
  await until(async () => (await runningCount()) >= 1, "the server to run the request");
  result.runningBeforeStop = await runningCount();
  result.stopEnabled = await page.isEnabled("#stop");
  await page.click("#stop");
  await page.waitForSelector(".message.assistant.stopped", { timeout: TIMEOUT_MS });
  await until(async () => (await runningCount()) === 0, "the running count to drop to 0");
  result.runningAfterStop = await runningCount();
  result.stoppedText = await page.textContent(last);
  const lengthAtStop = result.stoppedText.length;
  await new Promise((resolve) => setTimeout(resolve, 300)); // nothing more may arrive after stop
  result.grewAfterStop = ((await page.textContent(last)) || "").length !== lengthAtStop;
  result.sendEnabledAfterStop = await page.isEnabled("#send");
  await page.screenshot({ path: screenshot, fullPage: true });
  result.consoleErrors = consoleErrors;
  result.external = external;
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result) + "\n");
