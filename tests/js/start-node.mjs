// Starts the real node binary for the JS tests and resolves once it says where it listens:
// { child, addr }. Rejects if it exits first or does not start within 15 s.

import { spawn } from "node:child_process";
import { createInterface } from "node:readline";

export function startNode(binary, args) {
  return new Promise((resolve, reject) => {
    const child = spawn(binary, args, { stdio: ["ignore", "pipe", "inherit"] });
    const timer = setTimeout(() => reject(new Error("node did not start")), 15000);
    createInterface({ input: child.stdout }).on("line", (line) => {
      const match = line.match(/^fanfare listening on http:\/\/(.+)$/);
      if (match) {
        clearTimeout(timer);
        resolve({ child, addr: match[1] });
      }
    });
    child.on("exit", (code) => reject(new Error(`node exited with ${code}`)));
  });
}
