// cmkit's in-browser generator: onnxruntime-web runs the exported consistency model on this
// machine. For scripts and tests:
//   await window.cmkit.generate(noise, labels, steps)  -> Float32Array of pixels (0..255, NCHW)
//     noise: steps x n x C x H x W standard-normal values (the first n x C x H x W start the chain,
//     each further block re-noises for the next step); labels: n class indices (null without classes)
//   await window.cmkit.benchmark(n, steps, runs)        -> median milliseconds per generation
// URL parameters: ?threads=N (WebAssembly threads; needs cross-origin isolation), ?backend=wasm.

const params = new URLSearchParams(location.search);
const state = { meta: null, ort: null, generator: null, f: null, backend: null, threads: 1, loading: null };
let queue = Promise.resolve();
let described = false;  // one session call at a time: onnxruntime-web runs them in turn
const $ = (id) => document.getElementById(id);

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
  // The one-step graph downloads while onnxruntime-web loads; f(x, sigma) waits for a 2-step call.
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
  // Called in turn (one session call at a time), at the first generation of more than one step.
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
  } catch (e) {
    $('error').textContent = e.message || String(e);
  }
}

window.cmkit = { generate, benchmark, gaussians };
$('go').addEventListener('click', onGenerate);
$('class').addEventListener('input', showClassName);
// Images as soon as the model is in; firstImagesMs: when they were drawn, after navigation started.
window.cmkit.ready = onGenerate().then(() => {
  if (!$('error').textContent) window.cmkit.firstImagesMs = performance.now();
  showClassName();
});
