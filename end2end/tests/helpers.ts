import { APIRequestContext, expect, Page } from "@playwright/test";

let counter = 0;

/** A member of our own, so tests never depend on each other's data. */
export async function enroll(request: APIRequestContext, name: string): Promise<string> {
  const id = `e2e-${Date.now().toString(36)}-${process.pid}-${counter++}`;
  const response = await request.post("/api/members", {
    data: { member_id: id, name, email: `${id}@example.com` },
  });
  expect(response.status()).toBe(201);
  return id;
}

/** The staff console card whose heading is `title`. */
export function card(page: Page, title: string) {
  return page.locator("section.card", { has: page.getByRole("heading", { name: title, exact: true }) });
}
