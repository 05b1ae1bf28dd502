// Drive a web package in headless Chromium for `onnxpipe package RUN OUT --target web --check`.
//
//   node check_page.cjs JOB.json RESULT.json
//
// JOB.json: {url, executable, args, rows, row_dims, bench: {n, warmup}, preprocess: [{name, url}],
//            screenshot, timeout_ms}. The page is opened at `url` (a loopback server onnxpipe runs), every row
// is run alone through window.onnxpipe.runRows, the images are put through the page's preprocessing, the
// latency of n calls is measured in the page, a stroke is drawn on the pad with the mouse (image models), and the
// first reference input is shown and screenshotted.
// playwright-core comes from the npm registry (NODE_PATH points at onnxpipe's npm cache); the browser is
// the system's Chromium: nothing is downloaded here.
"use strict";
const fs = require("fs");
const { chromium } = require("playwright-core");

async function main() {
  const [jobFile, resultFile] = process.argv.slice(2);
  const job = JSON.parse(fs.readFileSync(jobFile, "utf8"));
  const browser = await chromium.launch({ executablePath: job.executable, args: job.args, headless: true,
                                          timeout: job.timeout_ms });
  const errors = [];
  const requests = [];
  try {
    const page = await browser.newPage({ viewport: { width: 900, height: 520 } });
    page.setDefaultTimeout(job.timeout_ms);
    page.on("pageerror", (e) => errors.push(String(e)));
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    page.on("request", (r) => requests.push(r.url()));
    await page.goto(job.url, { waitUntil: "load" });
    await page.waitForFunction(() => window.onnxpipe !== undefined);
    const info = await page.evaluate(async () => {
      await window.onnxpipe.ready;
      return { userAgent: navigator.userAgent, crossOriginIsolated: self.crossOriginIsolated,
               wasmThreads: window.onnxpipe.ort.env.wasm.numThreads };
    });
    const runs = await page.evaluate(([rows, dims]) => window.onnxpipe.runRows(rows, dims), [job.rows, job.row_dims]);
    const preprocess = {};
    for (const p of job.preprocess) {
      preprocess[p.name] = await page.evaluate((url) => window.onnxpipe.preprocessURL(url), p.url);
    }
    const bench = await page.evaluate(([row, dims, n, warmup]) => window.onnxpipe.bench(row, [1, ...dims], n, warmup),
                                      [job.rows[0], job.row_dims, job.bench.n, job.bench.warmup]);
    let drawn = null;
    if (await page.isVisible("#pad")) {
      // A person's stroke on the pad (a vertical bar, a "1"): pointer events -> the page's image path -> the model.
      await page.click("#clear");
      const box = await page.locator("#pad").boundingBox();
      await page.mouse.move(box.x + box.width / 2, box.y + box.height * 0.15);
      await page.mouse.down();
      for (let i = 1; i <= 10; i++) await page.mouse.move(box.x + box.width / 2, box.y + box.height * (0.15 + 0.07 * i));
      await page.mouse.up();
      await page.waitForFunction(() => document.getElementById("answer").textContent.startsWith("class "));
      drawn = await page.textContent("#answer");
    }
    const shown = await page.evaluate((row) => window.onnxpipe.show(row), job.rows[0]);
    await page.screenshot({ path: job.screenshot, fullPage: true });
    const result = { info, outputs: runs.outputs, call_ms: runs.ms, preprocess, bench, shown_logits: shown.logits, drawn,
                     status: await page.textContent("#status"), errors, requests };
    fs.writeFileSync(resultFile, JSON.stringify(result));
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  process.stderr.write(`check_page: ${e && e.stack ? e.stack.split("\n")[0] : e}\n`);
  process.exit(1);
});
