// PEC node pack: show a PEC node's report (the "text" entry of its UI output, sent after each run)
// in a read-only text box inside the node. ComfyUI's front end shows images of any node but text only
// for its own Preview Any; this adds the same box to every node in the PEC/ categories.
import { app } from "../../scripts/app.js";

const WIDGET = "pec_report";

function reportWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    const { ComfyWidgets } = window.comfyAPI.widgets;
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.element.readOnly = true;
    widget.serialize = false; // not saved in the workflow: the saved widget values stay in input order
    widget.options.serialize = false; // not sent with the prompt: a new report does not void ComfyUI's cache
  }
  return widget;
}

app.registerExtension({
  name: "PEC.NodeReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.category?.startsWith("PEC/")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (!text?.length) return;
      reportWidget(this).value = Array.isArray(text) ? text.join("\n") : String(text);
      this.setDirtyCanvas(true, true);
    };
  },
});
