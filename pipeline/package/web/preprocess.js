// What the run did to its inputs, in the browser: onnxpipe's one normalization and the image path of
// `onnxpipe predict`, step for step and in float32, so the page feeds the model what the run would.
//
//   normalize      core/data.py `normalize`: (x * scale - mean) / std with the run's recorded numbers
//                  (config.json "normalization"), each step rounded to float32 as numpy does
//   imageToInput   stages/predict.py `load_image` + `normalize(unit=True)`: grayscale (ITU-R 601 luma,
//                  Pillow's integer formula), dark-on-light images inverted, an area average down to the
//                  source's own resolution, a pixel-centre bilinear resize to the model's grid (Pillow's
//                  resampling coefficients), clipped to [0, 1]
//
// `onnxpipe package RUN OUT --target web --check` compares this file's output with Python's on the same
// image, so a drift between the two is caught.

const f32 = Math.fround;

export function normalize(values, norm, { unit = false } = {}) {
  const scale = f32(norm.scale), mean = f32(norm.mean), std = f32(norm.std);
  const out = new Float32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const x = unit ? f32(values[i]) : f32(f32(values[i]) * scale);
    out[i] = f32(f32(x - mean) / std);
  }
  return out;
}

// RGBA bytes (already composited over white, as Pillow's load_image does for transparent images) -> gray in [0, 1].
export function grayFromRGBA(rgba, width, height) {
  const gray = new Float32Array(width * height);
  for (let i = 0; i < width * height; i++) {
    const r = rgba[4 * i], g = rgba[4 * i + 1], b = rgba[4 * i + 2];
    const luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16; // Pillow's RGB -> L
    gray[i] = f32(luma / 255);
  }
  return gray;
}

function borderMean(gray, width, height) {
  let sum = 0, n = 0;
  for (let x = 0; x < width; x++) { sum += gray[x] + gray[(height - 1) * width + x]; n += 2; }
  for (let y = 0; y < height; y++) { sum += gray[y * width] + gray[y * width + width - 1]; n += 2; }
  return sum / n;
}

const FILTERS = {
  box: { support: 0.5, fn: (x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0) },
  bilinear: { support: 1.0, fn: (x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; } },
};

// Pillow's precompute_coeffs (Resample.c): per output pixel, the first source pixel and normalized weights.
function coefficients(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = filter.support * filterscale;
  const out = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    const k = [];
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      const w = filter.fn((x + xmin - center + 0.5) * ss);
      k.push(w);
      ww += w;
    }
    out.push({ xmin, k: k.map((w) => (ww !== 0.0 ? w / ww : w)) });
  }
  return out;
}

// A float32 ("F" mode) resize as Pillow does it: horizontal pass, then vertical, float32 in between.
export function resize(src, width, height, outW, outH, kind) {
  if (width === outW && height === outH) return Float32Array.from(src);
  const filter = FILTERS[kind];
  let img = src, w = width;
  if (outW !== width) {
    const cx = coefficients(width, outW, filter);
    const tmp = new Float32Array(outW * height);
    for (let y = 0; y < height; y++) {
      for (let xx = 0; xx < outW; xx++) {
        const { xmin, k } = cx[xx];
        let ss = 0.0;
        for (let x = 0; x < k.length; x++) ss += img[y * w + x + xmin] * k[x];
        tmp[y * outW + xx] = ss;
      }
    }
    img = tmp;
    w = outW;
  }
  if (outH !== height) {
    const cy = coefficients(height, outH, filter);
    const tmp = new Float32Array(w * outH);
    for (let yy = 0; yy < outH; yy++) {
      const { xmin: ymin, k } = cy[yy];
      for (let x = 0; x < w; x++) {
        let ss = 0.0;
        for (let y = 0; y < k.length; y++) ss += img[(y + ymin) * w + x] * k[y];
        tmp[yy * w + x] = ss;
      }
    }
    img = tmp;
  }
  return img;
}

// An image (RGBA bytes over white) -> the model's normalized input values, row-major (H, W).
export function imageToInput(rgba, width, height, cfg, { invert = "auto" } = {}) {
  let gray = grayFromRGBA(rgba, width, height);
  if (invert === "yes" || (invert === "auto" && borderMean(gray, width, height) > 0.5)) {
    gray = gray.map((v) => f32(1.0 - v));
  }
  let w = width, h = height;
  const native = cfg.image.native;
  if (native && native < Math.min(width, height)) {
    gray = resize(gray, w, h, native, native, "box");
    w = h = native;
  }
  const [gh, gw] = cfg.image.grid;
  gray = resize(gray, w, h, gw, gh, "bilinear");
  const clipped = gray.map((v) => Math.min(Math.max(v, 0.0), 1.0));
  return normalize(clipped, cfg.normalization, { unit: true });
}

// Back from model input to [0, 1] pixels (core/data.py `denormalize`), for drawing an example on the canvas.
export function denormalize(values, norm) {
  const out = new Float32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    out[i] = Math.min(Math.max(values[i] * norm.std + norm.mean, 0), 1);  // unit pixels: x * std + mean
  }
  return out;
}
