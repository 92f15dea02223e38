// cmkit's in-browser generator: onnxruntime-web runs the exported consistency model on this
// machine. For scripts and tests:
//   await window.cmkit.generate(noise, labels, steps)  -> Float32Array of pixels (0..255, NCHW)
//     noise: steps x n x C x H x W standard-normal values (the first n x C x H x W start the chain,
//     each further block re-noises for the next step); labels: n class indices (null without classes)
//   await window.cmkit.benchmark(n, steps, runs)        -> median milliseconds per generation
//   await window.cmkit.stroke(pixels, noise, labels, strength, steps) -> Float32Array (0..255, NCHW)
//     stroke editing (SDEdit), the live canvas's computation: pixels: n x C x H x W integers 0..255
//     (the model's channels); noise: steps x n x C x H x W standard-normal values (the first block
//     noises the canvas, each further block re-noises for the next level); strength in (0, 1]
//   window.cmkit.strengthLevels(strength, steps)        -> its noise levels (cmkit's strength_levels)
//   window.cmkit.canvasPixels()                         -> the live canvas as stroke's pixels (n = 1)
//   window.cmkit.live                                   -> the canvas's counters: computations, frames,
//     latencies (ms), result (the last frame, 0..255); await window.cmkit.live.idle() waits for it
//   await window.cmkit.benchmarkStroke(steps, runs, strength) -> median milliseconds per stroke frame
// URL parameters: ?threads=N (WebAssembly threads; needs cross-origin isolation), ?backend=wasm.

const params = new URLSearchParams(location.search);
const state = { meta: null, ort: null, generator: null, f: null, backend: null, threads: 1, loading: null };
let queue = Promise.resolve();
let described = false;  // one session call at a time: onnxruntime-web runs them in turn
const $ = (id) => document.getElementById(id);
const STROKE_STRENGTH = 0.6;  // cmkit.editing.tasks.STROKE_STRENGTH
const MAX_STROKE_STEPS = 4;

async function pickBackend() {
  if (params.get('backend') !== 'wasm' && navigator.gpu) {
    try {
      if (await navigator.gpu.requestAdapter()) return 'webgpu';
    } catch (e) { /* no adapter: WebAssembly */ }
  }
  return 'wasm';
}

async function fetchBytes(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`cannot load the model: ${path} (HTTP ${response.status})`);
  return new Uint8Array(await response.arrayBuffer());
}

async function load() {
  // The one-step graph downloads while onnxruntime-web loads; f(x, sigma) waits for its first use
  // (a 2-step generation, or the live canvas's first frame, after the first images).
  const meta = await (async () => {
    const response = await fetch('./model.json');
    if (!response.ok) throw new Error(`cannot load model.json (HTTP ${response.status})`);
    return response.json();
  })();
  const backend = await pickBackend();
  const [ort, bytes] = await Promise.all([
    import(backend === 'webgpu' ? './ort/ort.webgpu.min.mjs' : './ort/ort.wasm.min.mjs'),
    fetchBytes('./model.onnx'),
  ]);
  ort.env.wasm.wasmPaths = new URL('./ort/', import.meta.url).href;
  const cores = navigator.hardwareConcurrency || 1;
  const asked = Number(params.get('threads')) || cores;
  const threads = crossOriginIsolated ? Math.max(1, Math.min(asked, cores, 16)) : 1;
  ort.env.wasm.numThreads = threads;
  const options = { executionProviders: backend === 'webgpu' ? ['webgpu', 'wasm'] : ['wasm'] };
  let generator;
  try {
    generator = await ort.InferenceSession.create(bytes, options);
  } catch (e) {
    throw new Error(`cannot load the model: ${e.message || e}`);
  }
  Object.assign(state, { meta, ort, generator, f: null, options, backend, threads });
}

async function loadF() {
  // Called in turn (one session call at a time), at the first call that needs it.
  if (state.f) return state.f;
  try {
    state.f = await state.ort.InferenceSession.create(await fetchBytes('./' + state.meta.consistency_function),
                                                      state.options);
  } catch (e) {
    throw new Error(`cannot load the model's f(x, sigma): ${e.message || e}`);
  }
  return state.f;
}

function ensureLoaded() {
  if (!state.loading) state.loading = load().catch((e) => { state.loading = null; throw e; });  // a retry may work
  return state.loading;
}

function inTurn(task) {
  const result = queue.then(task);
  queue = result.catch(() => {});
  return result;
}

function checkLabels(labels, n) {
  const { meta } = state;
  if (!meta.num_classes) return null;
  if (!labels || labels.length !== n) throw new Error(`give ${n} class indices, one per image`);
  for (const c of labels) {
    if (!Number.isInteger(Number(c)) || c < 0 || c >= meta.num_classes) {
      throw new Error(`class ${c} is out of range: this model has classes 0 to ${meta.num_classes - 1}`);
    }
  }
  return new state.ort.Tensor('int64', BigInt64Array.from(labels, (c) => BigInt(Number(c))), [n]);
}

async function generate(noise, labels = null, steps = 1) {
  await ensureLoaded();
  const { meta, ort } = state;
  steps = Number(steps);
  const levels = steps === 1 ? [meta.sigma_max] : meta.multistep_sigmas[String(steps)];
  if (!levels) throw new Error(`steps must be 1 or ${Object.keys(meta.multistep_sigmas).join(', ')}`);
  if (steps > 1 && !meta.consistency_function) throw new Error('this site has no f(x, sigma) graph: one step only');
  const size = meta.shape.reduce((a, b) => a * b, 1);
  noise = Float32Array.from(noise);
  const n = noise.length / (steps * size);
  if (!Number.isInteger(n) || n < 1) {
    throw new Error(`noise must hold ${steps} x n x ${meta.shape.join(' x ')} values, got ${noise.length}`);
  }
  if (n > meta.max_batch) throw new Error(`at most ${meta.max_batch} images at once`);
  const classTensor = checkLabels(labels, n);
  const dims = [n, ...meta.shape];
  const feeds = (inputs) => (classTensor ? { ...inputs, class_labels: classTensor } : inputs);
  return inTurn(async () => {
    let out = await state.generator.run(feeds({ noise: new ort.Tensor('float32', noise.slice(0, n * size), dims) }));
    let x = out[state.generator.outputNames[0]].data;  // data units: 0..255, unclipped
    if (steps > 1) {
      const f = await loadF();
      x = x.map((v) => v / 127.5 - 1);
      for (let k = 1; k < steps; k++) {
        const sigma = levels[k];
        const scale = Math.sqrt(sigma * sigma - meta.sigma_min * meta.sigma_min);
        const xs = new Float32Array(n * size);
        for (let i = 0; i < xs.length; i++) xs[i] = x[i] + scale * noise[k * n * size + i];
        out = await f.run(feeds({
          x: new ort.Tensor('float32', xs, dims),
          sigma: new ort.Tensor('float32', new Float32Array(n).fill(sigma), [n]),
        }));
        x = out[f.outputNames[0]].data;
      }
      x = x.map((v) => (v + 1) * 127.5);
    }
    return Float32Array.from(x, (v) => Math.min(255, Math.max(0, v)));
  });
}

function strengthLevels(strength, steps = 1) {
  // cmkit.editing.tasks.strength_levels on the Karras axis: u_i = strength (1 - i/steps) for
  // i < steps, sigma_i = (lo + u_i (hi - lo))^rho with lo = sigma_min^(1/rho), hi = sigma_max^(1/rho).
  const { meta } = state;
  strength = Number(strength);
  steps = Number(steps);
  if (!(strength > 0 && strength <= 1)) throw new Error(`strength must be in (0, 1], got ${strength}`);
  if (!Number.isInteger(steps) || steps < 1 || steps > MAX_STROKE_STEPS) {
    throw new Error(`steps must be 1 to ${MAX_STROKE_STEPS}, got ${steps}`);
  }
  const rho = meta.rho || 7;  // sites written before model.json had rho: cmkit's default
  const lo = meta.sigma_min ** (1 / rho);
  const hi = meta.sigma_max ** (1 / rho);
  return Array.from({ length: steps }, (_, i) => (lo + strength * (1 - i / steps) * (hi - lo)) ** rho);
}

async function stroke(pixels, noise, labels = null, strength = STROKE_STRENGTH, steps = 1) {
  // SDEdit as cmkit.editing.tasks.stroke computes it: y = pixels / 127.5 - 1; x = y + sigma_0 z_0;
  // for each level: x0 = clip(f(x, sigma_i), -1, 1), then (not after the last) x = x0 +
  // sqrt(sigma_{i+1}^2 - sigma_min^2) z_{i+1}. Returns (x0 + 1) 127.5, unrounded.
  await ensureLoaded();
  const { meta, ort } = state;
  if (!meta.consistency_function) throw new Error('this site has no f(x, sigma) graph: no stroke editing');
  const levels = strengthLevels(strength, steps);
  steps = levels.length;
  const size = meta.shape.reduce((a, b) => a * b, 1);
  const n = pixels.length / size;
  if (!Number.isInteger(n) || n < 1) {
    throw new Error(`pixels must hold n x ${meta.shape.join(' x ')} values, got ${pixels.length}`);
  }
  if (n > meta.max_batch) throw new Error(`at most ${meta.max_batch} images at once`);
  noise = Float32Array.from(noise);
  if (noise.length !== steps * n * size) {
    throw new Error(`noise must hold ${steps} x ${n} x ${meta.shape.join(' x ')} values, got ${noise.length}`);
  }
  const y = new Float32Array(n * size);
  for (let i = 0; i < y.length; i++) {
    const v = Number(pixels[i]);
    if (!Number.isInteger(v) || v < 0 || v > 255) {
      throw new Error(`pixels are whole numbers 0 to 255, got ${pixels[i]}`);
    }
    y[i] = v / 127.5 - 1;
  }
  const classTensor = checkLabels(labels, n);
  const dims = [n, ...meta.shape];
  return inTurn(async () => {
    const f = await loadF();
    let x = new Float32Array(n * size);
    for (let i = 0; i < x.length; i++) x[i] = y[i] + levels[0] * noise[i];
    let x0 = null;
    for (let k = 0; k < steps; k++) {
      const inputs = {
        x: new ort.Tensor('float32', x, dims),
        sigma: new ort.Tensor('float32', new Float32Array(n).fill(levels[k]), [n]),
      };
      const out = await f.run(classTensor ? { ...inputs, class_labels: classTensor } : inputs);
      x0 = Float32Array.from(out[f.outputNames[0]].data, (v) => Math.min(1, Math.max(-1, v)));
      if (k + 1 < steps) {
        const scale = Math.sqrt(levels[k + 1] ** 2 - meta.sigma_min ** 2);
        x = new Float32Array(n * size);
        for (let i = 0; i < x.length; i++) x[i] = x0[i] + scale * noise[(k + 1) * n * size + i];
      }
    }
    return Float32Array.from(x0, (v) => Math.min(255, Math.max(0, (v + 1) * 127.5)));
  });
}

function gaussians(seed, count) {
  // mulberry32 and Box-Muller: the page's own seeded noise (not Python's generator)
  let a = (seed >>> 0) ^ 0x9e3779b9;
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) + 1) / 4294967297;
  };
  const out = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const r = Math.sqrt(-2 * Math.log(uniform()));
    const angle = 2 * Math.PI * uniform();
    out[i] = r * Math.cos(angle);
    if (i + 1 < count) out[i + 1] = r * Math.sin(angle);
  }
  return out;
}

async function benchmark(n = 1, steps = 1, runs = 10) {
  await ensureLoaded();
  const size = state.meta.shape.reduce((a, b) => a * b, 1);
  const noise = gaussians(1, steps * n * size);
  const labels = state.meta.num_classes ? Array.from({ length: n }, (_, i) => i % state.meta.num_classes) : null;
  const times = [];
  for (let i = 0; i < runs + 2; i++) {  // two warm-up runs
    const start = performance.now();
    await generate(noise, labels, steps);
    if (i >= 2) times.push(performance.now() - start);
  }
  times.sort((p, q) => p - q);
  return times[Math.floor(times.length / 2)];
}

function render(x, n) {
  const [c, h, w] = state.meta.shape;
  state.grid = { x, n };
  const grid = $('grid');
  grid.replaceChildren();
  for (let i = 0; i < n; i++) {
    const canvas = document.createElement('canvas');
    canvas.width = w;
    canvas.height = h;
    const context = canvas.getContext('2d');
    const image = context.createImageData(w, h);
    const base = i * c * h * w;
    for (let p = 0; p < h * w; p++) {
      for (let k = 0; k < 3; k++) image.data[4 * p + k] = Math.round(x[base + (c === 1 ? 0 : k) * h * w + p]);
      image.data[4 * p + 3] = 255;
    }
    context.putImageData(image, 0, 0);
    grid.appendChild(canvas);
  }
}

function describe() {
  const { meta, backend, threads } = state;
  const isolation = crossOriginIsolated ? '' : ' (the page is not cross-origin isolated: one thread)';
  $('about').textContent = `${meta.method} model, ${meta.shape.join('x')}, ${meta.precision}; ` +
    `onnxruntime-web ${meta.ort_web || ''} on ${backend} with ${threads} thread(s)${isolation}`;
  const classBox = $('class-box');
  classBox.hidden = !meta.num_classes;
  if (meta.num_classes) {
    $('class').min = 0;
    $('class').max = meta.num_classes - 1;
  }
  $('batch').max = meta.max_batch;
  if (!meta.consistency_function) $('steps').querySelector('option[value="2"]').remove();
}

function showClassName() {
  const names = state.meta && state.meta.class_names;
  const c = Number($('class').value);
  $('class-name').textContent = names && Number.isInteger(c) && names[c] !== undefined ? names[c] : '';
}

async function onGenerate() {
  $('error').textContent = '';
  try {
    await ensureLoaded();
    if (!described) {
      describe();
      described = true;
    }
    const { meta } = state;
    const n = Number($('batch').value);
    if (!Number.isInteger(n) || n < 1 || n > meta.max_batch) throw new Error(`images: 1 to ${meta.max_batch}`);
    const seed = Number($('seed').value);
    if (!Number.isInteger(seed) || seed < 0) throw new Error('the seed is a whole number, 0 or more');
    const steps = Number($('steps').value);
    const size = meta.shape.reduce((a, b) => a * b, 1);
    const labels = meta.num_classes ? new Array(n).fill(Number($('class').value)) : null;
    const start = performance.now();
    const x = await generate(gaussians(seed, steps * n * size), labels, steps);
    const ms = performance.now() - start;
    render(x, n);
    $('status').textContent = `${n} image(s) in ${steps} step(s): ${ms.toFixed(1)} ms on ${state.backend}, ` +
      `${state.threads} thread(s)`;
    startLive();  // the first time: the live canvas starts from the first of these images
  } catch (e) {
    $('error').textContent = e.message || String(e);
  }
}

// ---------------------------------------------------------------------------------------------
// The live canvas: stroke editing of what the visitor draws, recomputed as they draw. Latest wins:
// while a frame computes, a change only marks the canvas dirty, and the next frame reads the
// canvas as it is then; changes are never queued.

const live = {
  computations: 0, frames: 0, latencies: [], frameTimes: [], result: null,
  busy: false, dirty: false, started: false, waiters: [], undo: [], pointer: null, last: null,
  idle: () => (live.busy ? new Promise((resolve) => live.waiters.push(resolve)) : Promise.resolve()),
};
const LATENCY_WINDOW = 20;  // the p50 is over the last 20 frames
const UNDO_DEPTH = 50;

function luminance(r, g, b) {
  // Pillow's convert('L'), the grey `cmkit serve` and `cmkit edit` read from an RGB image:
  // (19595 R + 38470 G + 7471 B + 32768) >> 16, the fixed-point form of round(0.299 R + 0.587 G +
  // 0.114 B) (one level apart on 0.06% of colours). A grey pixel (R = G = B = v) gives v.
  return (19595 * r + 38470 * g + 7471 * b + 32768) >>> 16;
}

function canvasPixels() {
  // The canvas as the model's channels (C x H x W integers 0..255): RGB, or the luminance for grey.
  const [c, h, w] = state.meta.shape;
  const data = $('canvas').getContext('2d', { willReadFrequently: true }).getImageData(0, 0, w, h).data;
  const out = new Uint8Array(c * h * w);
  for (let p = 0; p < h * w; p++) {
    if (c === 1) out[p] = luminance(data[4 * p], data[4 * p + 1], data[4 * p + 2]);
    else for (let k = 0; k < c; k++) out[k * h * w + p] = data[4 * p + k];
  }
  return out;
}

function putPixels(canvas, x, base = 0) {
  // C x H x W values 0..255 (from index base) onto an H x W canvas, rounded; grey as R = G = B.
  const [c, h, w] = state.meta.shape;
  const context = canvas.getContext('2d', { willReadFrequently: true });
  const image = context.createImageData(w, h);
  for (let p = 0; p < h * w; p++) {
    for (let k = 0; k < 3; k++) image.data[4 * p + k] = Math.round(x[base + (c === 1 ? 0 : k) * h * w + p]);
    image.data[4 * p + 3] = 255;
  }
  context.putImageData(image, 0, 0);
}

function liveInputs() {
  const { meta } = state;
  const size = meta.shape.reduce((a, b) => a * b, 1);
  const seed = Number($('live-seed').value);
  if (!Number.isInteger(seed) || seed < 0) throw new Error('the seed is a whole number, 0 or more');
  const steps = Number($('live-steps').value);
  const labels = meta.num_classes ? [Number($('class').value)] : null;
  return { pixels: canvasPixels(), noise: gaussians(seed, steps * size), labels,
           strength: Number($('strength').value), steps };
}

function percentile50(values) {
  const sorted = [...values].sort((p, q) => p - q);
  return sorted[Math.floor((sorted.length - 1) / 2)];
}

function showStats() {
  const now = performance.now();
  live.frameTimes = live.frameTimes.filter((t) => now - t <= 1000);
  const p50 = live.latencies.length ? `${percentile50(live.latencies).toFixed(1)} ms` : '-';
  $('live-stats').textContent = `${live.frameTimes.length} fps (frames in the last second), latency p50 ${p50} ` +
    `(last ${live.latencies.length} frames), ${live.frames} frame(s) in all`;
}

async function computeFrames() {
  live.busy = true;
  try {
    while (live.dirty) {
      live.dirty = false;
      live.computations += 1;
      const start = performance.now();
      try {
        const { pixels, noise, labels, strength, steps } = liveInputs();
        const x = await stroke(pixels, noise, labels, strength, steps);
        putPixels($('result'), x);
        live.result = x;
        live.frames += 1;
        const end = performance.now();
        live.latencies = [...live.latencies, end - start].slice(-LATENCY_WINDOW);
        live.frameTimes.push(end);
        $('download').disabled = false;
        if (live.failed) $('error').textContent = '';
        live.failed = false;
        showStats();
      } catch (e) {
        $('error').textContent = e.message || String(e);
        live.failed = true;
      }
    }
  } finally {
    live.busy = false;
    live.waiters.splice(0).forEach((resolve) => resolve());
  }
}

function requestFrame() {
  if (!live.started) return;
  live.dirty = true;
  if (!live.busy) computeFrames();
}

function pushUndo() {
  const [, h, w] = state.meta.shape;
  live.undo.push($('canvas').getContext('2d', { willReadFrequently: true }).getImageData(0, 0, w, h));
  if (live.undo.length > UNDO_DEPTH) live.undo.shift();
  $('undo').disabled = false;
}

function brushColour() {
  // A grey model's canvas is painted in the colour's luminance: what it shows is what the model gets.
  const hex = $('color').value;
  if (state.meta.shape[0] !== 1) return hex;
  const v = luminance(...[1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)));
  return `rgb(${v}, ${v}, ${v})`;
}

function canvasPoint(event) {
  // Where the pointer is, in model pixels (floats).
  const [, h, w] = state.meta.shape;
  const r = $('canvas').getBoundingClientRect();
  return { x: (event.clientX - r.left) * w / r.width, y: (event.clientY - r.top) * h / r.height };
}

function paintLine(from, to) {
  // Square dabs of the brush size every half pixel from `from` to `to`, on whole pixels.
  const context = $('canvas').getContext('2d', { willReadFrequently: true });
  const size = Number($('size').value);
  context.fillStyle = brushColour();
  const count = Math.max(1, Math.ceil(2 * Math.hypot(to.x - from.x, to.y - from.y)));
  for (let i = 0; i <= count; i++) {
    const x = from.x + (to.x - from.x) * i / count;
    const y = from.y + (to.y - from.y) * i / count;
    context.fillRect(Math.round(x - size / 2), Math.round(y - size / 2), size, size);
  }
}

function onPointerDown(event) {
  if (!live.started || live.pointer !== null || (event.pointerType === 'mouse' && event.button !== 0)) return;
  event.preventDefault();
  try {
    $('canvas').setPointerCapture(event.pointerId);
  } catch (e) { /* a synthetic event's pointer cannot be captured */ }
  pushUndo();
  if (!$('lock').checked) $('live-seed').value = Number($('live-seed').value) + 1;  // a new seed per stroke
  live.pointer = event.pointerId;
  live.last = canvasPoint(event);
  paintLine(live.last, live.last);
  requestFrame();
}

function onPointerMove(event) {
  if (event.pointerId !== live.pointer) return;
  event.preventDefault();
  const events = (event.getCoalescedEvents && event.getCoalescedEvents()) || [];
  for (const e of events.length ? events : [event]) {
    const point = canvasPoint(e);
    paintLine(live.last, point);
    live.last = point;
  }
  requestFrame();
}

function onPointerEnd(event) {
  if (event.pointerId === live.pointer) live.pointer = null;
}

function fromSample() {
  // The canvas becomes the first image of the grid (blank when there is none yet).
  if (state.grid) putPixels($('canvas'), state.grid.x);
  else clearCanvas();
}

function clearCanvas() {
  // Blank: black, the background of cmkit's digit and clothing data.
  const [, h, w] = state.meta.shape;
  const context = $('canvas').getContext('2d', { willReadFrequently: true });
  context.fillStyle = '#000';
  context.fillRect(0, 0, w, h);
}

function download() {
  $('result').toBlob((blob) => {
    const link = document.createElement('a');
    link.href = URL.createObjectURL(blob);
    link.download = `cmkit-stroke-seed${$('live-seed').value}.png`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }, 'image/png');
}

function startLive() {
  // Once the model is in: size the canvases, start from the first sample (or blank), draw a frame.
  if (live.started || !state.meta) return;
  const { meta } = state;
  const [c, h, w] = meta.shape;
  if (!meta.consistency_function || c > 3) return;  // stroke editing needs f(x, sigma) and RGB or grey
  const scale = 256 / Math.max(h, w);
  for (const id of ['canvas', 'result']) {
    Object.assign($(id), { width: w, height: h });
    Object.assign($(id).style, { width: `${Math.round(w * scale)}px`, height: `${Math.round(h * scale)}px` });
  }
  $('size').max = Math.max(2, Math.ceil(Math.max(h, w) / 2));
  $('size').value = Math.max(1, Math.round(Math.max(h, w) / 16));
  $('size-value').textContent = $('size').value;
  $('live-grey').textContent = c === 1 ? ' This model is grey: the canvas is painted in the brush colour\'s ' +
    'luminance.' : '';
  fromSample();
  $('live').hidden = false;
  live.started = true;
  requestFrame();
}

async function benchmarkStroke(steps = 1, runs = 10, strength = STROKE_STRENGTH) {
  // Median milliseconds of one live frame's computation (one canvas, seeded pixels and noise).
  await ensureLoaded();
  const { meta } = state;
  const size = meta.shape.reduce((a, b) => a * b, 1);
  const pixels = Uint8Array.from(gaussians(2, size), (v) => Math.min(255, Math.max(0, Math.round(128 + 60 * v))));
  const noise = gaussians(3, steps * size);
  const labels = meta.num_classes ? [0] : null;
  const times = [];
  for (let i = 0; i < runs + 2; i++) {  // two warm-up runs
    const start = performance.now();
    await stroke(pixels, noise, labels, strength, steps);
    if (i >= 2) times.push(performance.now() - start);
  }
  return percentile50(times);
}

window.cmkit = { generate, benchmark, gaussians, stroke, strengthLevels, canvasPixels, benchmarkStroke, live };
$('go').addEventListener('click', onGenerate);
$('class').addEventListener('input', () => {
  showClassName();
  requestFrame();
});
$('canvas').addEventListener('pointerdown', onPointerDown);
$('canvas').addEventListener('pointermove', onPointerMove);
for (const name of ['pointerup', 'pointercancel', 'lostpointercapture']) {
  $('canvas').addEventListener(name, onPointerEnd);
}
for (const id of ['live-steps', 'live-seed']) $(id).addEventListener('change', requestFrame);
$('strength').addEventListener('input', () => {
  $('strength-value').textContent = Number($('strength').value).toFixed(2);
  requestFrame();
});
$('size').addEventListener('input', () => { $('size-value').textContent = $('size').value; });
$('undo').addEventListener('click', () => {
  const image = live.undo.pop();
  if (image) $('canvas').getContext('2d', { willReadFrequently: true }).putImageData(image, 0, 0);
  $('undo').disabled = live.undo.length === 0;
  requestFrame();
});
$('clear').addEventListener('click', () => {
  pushUndo();
  clearCanvas();
  requestFrame();
});
$('from-sample').addEventListener('click', () => {
  pushUndo();
  fromSample();
  requestFrame();
});
$('download').addEventListener('click', download);
setInterval(() => { if (live.started) showStats(); }, 500);  // the fps falls to 0 when nothing is drawn
// Images as soon as the model is in; firstImagesMs: when they were drawn, after navigation started.
window.cmkit.ready = onGenerate().then(() => {
  if (!$('error').textContent) window.cmkit.firstImagesMs = performance.now();
  showClassName();
});
