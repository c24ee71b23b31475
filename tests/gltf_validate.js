// Validate one .glb/.gltf file with the Khronos glTF validator's JS API and print the report JSON.
// Usage: node tests/gltf_validate.js FILE   (needs node_modules/gltf-validator: bash .ci/install-test-tools)
// Exit status: 0 when a report was printed (read report.issues.numErrors), non-zero when validation could not run.
"use strict";
const fs = require("fs");
const path = require("path");
const validator = require(path.join(__dirname, "..", "node_modules", "gltf-validator"));

const file = process.argv[2];
if (!file) {
  console.error("usage: node tests/gltf_validate.js FILE");
  process.exit(2);
}
validator
  .validateBytes(new Uint8Array(fs.readFileSync(file)), {
    uri: path.basename(file),
    maxIssues: 0, // report every issue
    writeTimestamp: false,
  })
  .then(
    (report) => console.log(JSON.stringify(report, null, 2)),
    (error) => {
      console.error(`validation could not run: ${error}`);
      process.exit(2);
    }
  );
