// The proxy-wasm host (module "env") for the filter's unit tests on wasm32-unknown-unknown,
// run in Node by wasm-bindgen-test-runner (scripts/test puts this directory on NODE_PATH).
// The test binary links the proxy-wasm SDK, whose exports import the host's calls; the pure
// logic under test makes none, so each one here fails the test that would reach it.
module.exports = new Proxy({}, {
  get: (_, name) => () => {
    throw new Error(`proxy-wasm host call ${String(name)} in a unit test`);
  },
});
