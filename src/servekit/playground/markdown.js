// A small, safe Markdown renderer for the playground: the text is HTML-escaped first, so nothing the
// model writes becomes markup except what the rules below produce. Links are http(s) only.
"use strict";

(function (global) {
  function escapeHtml(text) {
    return text
      .replace(/&/g, "&amp;")
      .replace(/</g, "&lt;")
      .replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;")
      .replace(/'/g, "&#39;");
  }

  function inline(text) {
    // Code spans first, kept aside so their content is not formatted.
    const spans = [];
    let out = text.replace(/`([^`\n]+)`/g, function (_, code) {
      spans.push("<code>" + code + "</code>");
      return "\u0000" + (spans.length - 1) + "\u0000";
    });
    out = out
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)"]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
    return out.replace(/\u0000(\d+)\u0000/g, function (_, i) { return spans[Number(i)]; });
  }

  function render(source) {
    const lines = escapeHtml(source).split("\n");
    const html = [];
    let paragraph = [];
    let list = null; // "ul" or "ol"
    let fence = null; // lines of an open code block

    function flushParagraph() {
      if (paragraph.length) html.push("<p>" + paragraph.map(inline).join("<br>") + "</p>");
      paragraph = [];
    }
    function closeList() {
      if (list) html.push("</" + list + ">");
      list = null;
    }

    for (const line of lines) {
      if (fence !== null) {
        if (/^\s*```/.test(line)) {
          html.push("<pre><code>" + fence.join("\n") + "</code></pre>");
          fence = null;
        } else {
          fence.push(line);
        }
        continue;
      }
      if (/^\s*```/.test(line)) {
        flushParagraph(); closeList();
        fence = [];
        continue;
      }
      const heading = /^(#{1,6})\s+(.*)$/.exec(line);
      const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
      const numbered = /^\s*\d+[.)]\s+(.*)$/.exec(line);
      if (heading) {
        flushParagraph(); closeList();
        const level = heading[1].length;
        html.push("<h" + level + ">" + inline(heading[2]) + "</h" + level + ">");
      } else if (bullet || numbered) {
        flushParagraph();
        const kind = bullet ? "ul" : "ol";
        if (list !== kind) { closeList(); html.push("<" + kind + ">"); list = kind; }
        html.push("<li>" + inline((bullet || numbered)[1]) + "</li>");
      } else if (!line.trim()) {
        flushParagraph(); closeList();
      } else {
        closeList();
        paragraph.push(line);
      }
    }
    if (fence !== null) html.push("<pre><code>" + fence.join("\n") + "</code></pre>"); // still streaming
    flushParagraph(); closeList();
    return html.join("");
  }

  global.renderMarkdown = render;
  global.escapeHtml = escapeHtml;
})(typeof window !== "undefined" ? window : globalThis);
