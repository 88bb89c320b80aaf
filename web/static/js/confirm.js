// Forms with data-confirm="question" ask before they submit (the page's
// Content-Security-Policy forbids inline handlers such as onsubmit).
document.addEventListener("submit", (event) => {
  const question = event.target.dataset ? event.target.dataset.confirm : undefined;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
